"""Loading a trained model for inference, and answering questions at a chosen m.

Shared by the evaluation sweep (mqt/evaluate.py) and the predict command
(predict.py). Weights come from an orbax checkpoints folder written by
train.py (default: the last stage of `--workdir`), or, with
`checkpoint="hf"`, from the HF weights named in `config.init` (e.g. the
released MQT-LLaVA-7B: `--config.init.kind=hf --config.init.mqt_llava=DIR`).
Every path is checked, and every failure named, before any compute.

`Answerer` compiles one program per (m, prompt length, batch size) ahead of
time: `num_latents=m`, so the query transformer runs m latents and the
prompt is T + m - 1 slots: cost and latency shrink with m. m is always
explicit and validated (1 <= m <= M); there is no default.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from data import images as images_lib
from data import templates
from data import tokenizer as tokenizer_lib
from mqt import generate as gen
from mqt import matryoshka
from mqt import sharding as shard_lib
from mqt import train
from mqt.model import MQTLLaVA, ModelConfig, abstract_params


def default_checkpoint(config, workdir: str) -> str:
  stages = train.stages_to_run(config)
  return os.path.join(workdir, f"stage{stages[-1] if stages else 2}", "checkpoints")


def resolve_paths(config, workdir: str, checkpoint: str = "") -> tuple[str, str]:
  """-> (checkpoint folder or "hf", tokenizer path); a ValueError lists every problem."""
  problems = []
  checkpoint = checkpoint or default_checkpoint(config, workdir)
  if checkpoint == "hf":
    problems += train.hf_init_problems(config)
  elif not os.path.isdir(checkpoint):
    problems.append(f"checkpoint folder {checkpoint} does not exist (train first with "
                    f"python train.py --workdir=..., or pass --checkpoint=DIR or =hf)")
  tok = train.tokenizer_path(config, config.eval.data, workdir)
  if config.tokenizer_path or config.eval.data.kind != "builtin":
    problems.append(train.path_problem("tokenizer_path", config.tokenizer_path,
                                       train.TOKENIZER_WHAT))
  elif not os.path.isfile(tok):
    problems.append(f"the built-in tokenizer {tok} does not exist (train.py writes it; or set "
                    f"--config.tokenizer_path)")
  problems = [p for p in problems if p]
  if problems:
    raise ValueError("cannot load the model:\n  " + "\n  ".join(problems))
  return checkpoint, tok


@dataclasses.dataclass
class Loaded:
  model_cfg: ModelConfig
  model: MQTLLaVA
  params: object
  tokenizer: tokenizer_lib.Tokenizer
  mesh: object
  checkpoint: str
  template: str = "vicuna_v1"  # The prompt template (config.eval.data.template).


def load(config, workdir: str, checkpoint: str = "") -> Loaded:
  """Parameters (sharded over the config's mesh) and tokenizer, paths checked first."""
  checkpoint, tok_path = resolve_paths(config, workdir, checkpoint)
  model_cfg = ModelConfig.from_config(config.model)
  tokenizer = tokenizer_lib.Tokenizer.load(tok_path)
  if tokenizer.vocab_size > model_cfg.llm.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model's "
                     f"vocabulary is {model_cfg.llm.vocab_size}")
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  model = MQTLLaVA(model_cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.logical_axis_rules)):
    if checkpoint == "hf":
      boxed = abstract_params(model_cfg)["params"]
      shardings = shard_lib.param_shardings(boxed, mesh,
                                            tuple(config.sharding.logical_axis_rules))
      hf = config.copy_and_resolve_references()
      hf.init.kind = "hf"
      params = train.fresh_params(hf, model_cfg, model, shardings)
    else:
      params = train.load_params(checkpoint, model_cfg, mesh, config)
  return Loaded(model_cfg, model, params, tokenizer, mesh, checkpoint,
                config.eval.data.template)


def encode_prompt(question: str, tokenizer, has_image: bool, template: str = "vicuna_v1"):
  """A user turn (without `<image>`) -> prompt ids with the image placeholder first."""
  text = (templates.IMAGE_TOKEN + "\n" + question) if has_image else question
  return templates.prompt_for_generation(text, tokenizer, template, has_image=has_image)


def pad_prompts(prompts: list[list[int]], text_len: int, pad_id: int = 0):
  """-> (ids [N, text_len] int32, mask [N, text_len] bool), right padded."""
  ids = np.full((len(prompts), text_len), pad_id, np.int32)
  mask = np.zeros((len(prompts), text_len), bool)
  for i, p in enumerate(prompts):
    if len(p) > text_len:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the {text_len} allowed")
    ids[i, :len(p)], mask[i, :len(p)] = p, True
  return ids, mask


def load_images(paths, size: int) -> np.ndarray:
  """Image files -> [N, size, size, 3] float32 (pad to square, CLIP normalization);
  None -> zeros (a text-only prompt, which has no placeholder)."""
  out = np.zeros((len(paths), size, size, 3), np.float32)
  for i, p in enumerate(paths):
    if p is not None:
      out[i] = images_lib.load_and_preprocess(p, size, "pad")
  return out


class Answerer:
  """Batched generation at one m, compiled ahead of time for fixed shapes."""

  def __init__(self, loaded: Loaded, m: int, batch_size: int, text_len: int,
               sampling: gen.SamplingConfig, seed: int = 0):
    self.m = matryoshka.validate_m(m, loaded.model_cfg.query.num_queries)
    self.loaded, self.batch_size, self.text_len = loaded, batch_size, text_len
    self.sampling = sampling
    self.seed = seed
    model, size = loaded.model, loaded.model_cfg.vision.image_size
    m = self.m
    sds = jax.ShapeDtypeStruct
    shapes = (sds((batch_size, size, size, 3), jnp.float32),
              sds((batch_size, text_len), jnp.int32), sds((batch_size, text_len), jnp.bool_))
    def run(params, images, ids, mask, batch_index):
      rng = jax.random.fold_in(jax.random.key(seed), batch_index)
      return gen.generate(model, params, images, ids, mask, m, rng, sampling, num_latents=m)
    def first(params, images, ids, mask):
      return gen.prefill(model, params, images, ids, mask, m, sampling.max_new_tokens,
                         num_latents=m)[0]
    t0 = time.perf_counter()
    with jax.set_mesh(loaded.mesh):
      self._generate = jax.jit(run).lower(loaded.params, *shapes,
                                          sds((), jnp.int32)).compile()
      self._prefill = jax.jit(first).lower(loaded.params, *shapes).compile()
    self.compile_s = time.perf_counter() - t0
    self.generate_s, self.batches, self.tokens = 0.0, 0, 0

  def prefill_latency(self, images, ids, mask, repeats: int = 5) -> float:
    """Median seconds of the prompt pass on one batch (after a warm-up call)."""
    with jax.set_mesh(self.loaded.mesh):
      jax.block_until_ready(self._prefill(self.loaded.params, images, ids, mask))
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(self._prefill(self.loaded.params, images, ids, mask))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

  def __call__(self, images, ids, mask, rows: int | None = None) -> list[str]:
    """One batch (padded to batch_size) -> the answers of its first `rows` rows."""
    rows = len(ids) if rows is None else rows
    t0 = time.perf_counter()
    with jax.set_mesh(self.loaded.mesh):
      out = jax.device_get(self._generate(self.loaded.params, images, ids, mask,
                                          np.int32(self.batches)))
    self.generate_s += time.perf_counter() - t0
    self.batches += 1
    tok = self.loaded.tokenizer
    answers = []
    for r in range(rows):
      n = int(out["num_tokens"][r])
      ids_r = [int(t) for t in out["tokens"][r, :n] if int(t) != self.sampling.eos_id]
      self.tokens += n
      answers.append(tok.decode(ids_r).strip())
    return answers


def sampling_config(gen_cfg, tokenizer) -> gen.SamplingConfig:
  return gen.SamplingConfig(max_new_tokens=int(gen_cfg.max_new_tokens),
                            temperature=float(gen_cfg.temperature), top_p=float(gen_cfg.top_p),
                            eos_id=tokenizer.eos_id, pad_id=max(tokenizer.pad_id, 0))


def answer(loaded: Loaded, image_paths, questions, m: int, gen_cfg, text_len: int | None = None):
  """Images + questions (one each; a None image = text only) at m -> answers."""
  prompts = [encode_prompt(q, loaded.tokenizer, p is not None, loaded.template)
             for p, q in zip(image_paths, questions)]
  text_len = text_len or max(len(p) for p in prompts)
  ids, mask = pad_prompts(prompts, text_len, max(loaded.tokenizer.pad_id, 0))
  runner = Answerer(loaded, m, len(prompts), text_len,
                    sampling_config(gen_cfg, loaded.tokenizer))
  return runner(load_images(image_paths, loaded.model_cfg.vision.image_size), ids, mask)


def check_images(paths) -> None:
  """Every image opens and decodes (a clear error naming the file otherwise)."""
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"image {p} does not exist")
    images_lib.load_image(p)
