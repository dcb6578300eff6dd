"""Helpers for `get_config(arg)` files: structural knobs after `:`.

`--config=configs/mqt_llava.py:stage=2,variant=perceiver` passes the text
after `:` to `get_config`, which parses it here against its declared knobs.
An unknown knob or a value of the wrong type is an error that names it.
"""
import ml_collections

from mqt.benchmarks import registry


def parse_knobs(arg: str | None, **defaults):
  """Parses "k=v,k2=v2" into a ConfigDict over `defaults` (types from defaults)."""
  knobs = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"config knob {item!r} is not of the form key=value")
    if key not in defaults:
      raise ValueError(f"unknown config knob {key!r}; known knobs: {sorted(defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        knobs[key] = value.lower() in ("true", "1")
      else:
        knobs[key] = kind(value)
    except ValueError:
      raise ValueError(f"config knob {key}={value!r} is not a valid {kind.__name__}") from None
  return ml_collections.ConfigDict(knobs)


def logical_axis_rules():
  """Default logical-axis -> mesh-axis table (maxtext-style FSDP + tensor)."""
  return (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("vis_embed", "fsdp"),
      ("llm_embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", "tensor"),
      ("vocab", "tensor"),
      ("latents", None),
      ("layers", None),
      # Activations (layers.ACTIVATION): the batch above; positions and width whole.
      ("length", None),
      ("act_embed", None),
  )


def data_block(kind="builtin", split="train", template="vicuna_v1", image_mode="pad",
               batch_size=32, group_by_modality=True, max_len=0, split_rounds=False):
  """Where one stage (or the evaluation) reads its samples from."""
  return ml_collections.ConfigDict(dict(
      kind=kind,  # builtin (the synthetic set, prepared on first use) | tfds | json
      split=split,  # builtin/tfds split: captions | instruct | eval | train
      dataset_dir="",  # tfds: a folder prepared by `python -m data.prepare`
      json_path="",  # json: a LLaVA conversation JSON ...
      image_folder="",  # ... and the folder its image paths are relative to
      template=template,  # plain (stage 1) | vicuna_v1 (stage 2, eval) | qa (tiny)
      image_mode=image_mode,  # crop (stage 1) | pad (stage 2, eval)
      batch_size=batch_size,  # Global batch size.
      group_by_modality=group_by_modality,  # All-image or all-text batches.
      max_len=max_len,  # Sequence length for this data (0: config.data.max_len).
      split_rounds=split_rounds))  # One sample per question-answer round.


DATA_KINDS = ("builtin", "tfds", "json")


def data_blocks(config) -> list[tuple[str, object]]:
  """(config path, data block) of every stage in `config.run_stages` and the evaluation."""
  names = [f"stage{x.strip()}" for x in str(config.get("run_stages", "")).split(",")
           if x.strip()]
  out = [(f"{n}.data", config[n].data) for n in names if n in config]
  if "eval" in config and "data" in config.eval:
    out.append(("eval.data", config.eval.data))
  return out


def infer_data_kinds(config, explicit: set[str] = frozenset()) -> list[str]:
  """Makes every data block's source explicit: a block left at kind="builtin" that
  names a file (`json_path`) or a prepared folder (`dataset_dir`) reads that, as
  kind "json" or "tfds" (in place; the config must be unlocked or unlocked here).
  Never ignores a path: a block that names both, or one whose kind was set to
  "builtin" on the command line (`explicit`: the fields `cli.user_settings()` gives)
  beside a path, is an error naming the fields. -> one note per inferred kind."""
  notes, problems = [], []
  for where, d in data_blocks(config):
    paths = [f for f in ("json_path", "dataset_dir") if d.get(f)]
    if d.kind != "builtin" or not paths:
      continue
    if len(paths) > 1:
      problems.append(f"--config.{where}.json_path and --config.{where}.dataset_dir are both "
                      f"set: choose one (kind=json or kind=tfds)")
      continue
    if f"{where}.kind" in explicit:
      problems.append(f"--config.{where}.kind=builtin ignores --config.{where}.{paths[0]}="
                      f"{d[paths[0]]}: drop one of them")
      continue
    kind = "json" if paths[0] == "json_path" else "tfds"
    with d.unlocked():
      d.kind = kind
    notes.append(f"config.{where}.kind = {kind} (from {paths[0]}={d[paths[0]]})")
  if problems:
    raise ValueError("; ".join(problems))
  return notes


def max_text_len(config, block, where: str = "") -> int:
  """Text tokens one sequence of `block` holds beside the M visual tokens (the image
  placeholder is one of them): its max_len, or config.data.max_len where that is 0,
  minus M, plus 1. An error names the field that leaves no room (`where`: the
  block's config path, e.g. "config.stage2.data")."""
  own = int(block.get("max_len") or 0)
  name = f"{where}.max_len" if where else "the data block's max_len"
  max_len, field = (own, name) if own else (int(config.data.max_len), "config.data.max_len")
  num_queries = int(config.model.query.num_queries)
  if max_len - num_queries + 1 < 2:
    raise ValueError(f"{field}={max_len} leaves no room for text after {num_queries} "
                     f"visual tokens")
  return max_len - num_queries + 1


def stage_block(*, steps, lr, rules, matryoshka_kind, data, m=0, ms=(), warmup=0.03,
                accum_steps=1, clip_norm=0.0, buckets=()):
  """One stage of the recipe: data, optimizer groups and the m distribution."""
  return ml_collections.ConfigDict(dict(
      steps=steps,  # Optimizer steps in this stage.
      accum_steps=accum_steps,  # Gradient accumulation micro-batches per step.
      init_from="",  # A checkpoint directory to take parameters from (else the previous stage).
      reinit="",  # Regex over "component/.../leaf" paths: these start fresh (random init)
                  # instead of carrying over from init_from / the previous stage.
      data=data,
      optim=ml_collections.ConfigDict(dict(
          lr=lr, warmup=warmup,  # warmup: a fraction of steps (< 1) or a step count.
          b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
          clip_norm=clip_norm,  # 0: no clipping (the paper's practice).
          # Ordered (regex over "component/.../leaf" paths, lr multiplier or None = frozen).
          rules=rules)),
      matryoshka=ml_collections.ConfigDict(dict(
          kind=matryoshka_kind,  # official | uniform | log_uniform | fixed | list
          m=m,  # fixed: the m (0 = M)
          ms=tuple(ms),  # list: every m of a step
          # Step shapes: one compiled step per size n (n latents, T + n - 1 slots); each
          # step runs in the smallest n >= its m. () = one step shape with all M latents.
          buckets=tuple(buckets)))))


STAGE1_RULES = (("^query/", 1.0), ("^vision/", None), ("^llm/", None))
STAGE2_RULES = (("^query/", 1.0), ("^llm/", 1.0), ("^vision/", None))


def benchmark_paths():
  """Where each published benchmark's files are (users supply them): one block per
  benchmark of mqt/benchmarks/registry.py that reads files, with the fields its module
  declares (and describes). `--benchmarks=builtin` reads the built-in synthetic versions
  instead."""
  c = ml_collections.ConfigDict
  return c({name: c(fields) for name, fields in registry.config_fields().items()})


def run_block(config):
  """Fields every training config shares (filled in place)."""
  config.seed = 0
  config.tokenizer_path = ""  # A LLaMA tokenizer.model (builtin data brings its own).
  config.log_every = 10
  config.data = ml_collections.ConfigDict(dict(
      max_len=2048,  # Tokens after the image is spliced in (T = max_len - M + 1 text tokens).
      overlong="truncate",  # truncate | reject (both counted, never silent)
      on_error="fail",  # fail (name the sample) | skip (log and count)
      worker_count=0,  # grain worker processes
      data_dir="",  # builtin: where the synthetic set is prepared ("" = <workdir>/data)
      builtin_seed=0, builtin_image_size=64,
      builtin_sizes=ml_collections.ConfigDict(dict(captions=4000, instruct=12000, eval=600))))
  config.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=2, use_async=True))
  config.init = ml_collections.ConfigDict(dict(
      kind="random",  # random | hf | checkpoint (the first stage's init_from)
      mqt_llava="",  # hf: an HF-format MQT-LLaVA checkpoint, or ...
      clip="", llm=""))  # ... HF CLIP vision + LLaMA/Vicuna checkpoints
  config.eval = ml_collections.ConfigDict(dict(
      ms=(1, 2, 4, 8, 16),
      data=data_block(split="eval", batch_size=64, group_by_modality=False),
      chance=ml_collections.ConfigDict(),
      # Generation-based sweeps (evaluate.py, predict.py).
      generation=ml_collections.ConfigDict(dict(
          batch_size=32, max_new_tokens=16, temperature=0.0, top_p=1.0)),
      benchmarks=benchmark_paths()))
  config.distributed = False  # True on multi-host pods: jax.distributed.initialize().
  config.device_memory_gib = 0.0  # GiB a device may hold (0: its own limit; CPU: none).
  return config
