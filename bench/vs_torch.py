r"""The project's train step and prefill against eager PyTorch at identical shapes.

  python -m bench.vs_torch                                # tiny and medium, 3 rounds
  python -m bench.vs_torch --shapes=tiny --rounds=5 --steps=10 --what=step

Both sides build the same model from one set of HF configs: HF CLIP (vision
tower, frozen), the official query transformer (tests/torch_reference.py) and
HF LLaMA (eager attention), joined by LLaVA's splice; the query transformer and
the LLM train with AdamW (the paper's stage-2 trainability). Batch `--batch`
rows of `--text_len` text tokens (the `<image>` placeholder at position 1, the
second half labelled). Each step draws its m uniformly from 1..M; both sides
get the same m sequence in a round. The jax side runs each step in its
power-of-two m bucket (`--buckets`, as `config.stageN.matryoshka.buckets`);
every bucket a round uses is compiled before the timed steps.

Each round runs the two sides in separate processes, one after the other
(jax first in even rounds, torch first in odd ones): a process builds its
model, runs one untimed step (compilation on the jax side) and times
`--steps` steps. The table gives the median step over all rounds.

Prefill (`--what=prefill`): batch 1 and 8, m = 1, 16 and M, the prompt of
`--text_len` tokens; jax runs `mqt.generate.prefill` compiled per m (cache of
S + `--max_new_tokens` slots), torch the same modules under inference_mode with
HF's cache, the last position's logits on both sides. Each call is warmed once,
then timed once per pass over `--prefill_runs` passes.

FLOPs per step (one convention for both sides): MaxText model FLOPs
(`bench.common.model_flops`: matmuls, multiply-add = 2, at the step's own m and
exact length T + m - 1; the frozen vision tower forward only, the query transformer
and the LLM 3x their forward, causal LLM attention halved, the LM head at every
position but the last). Work a side does beyond that (padding to a bucket,
elementwise ops) is not counted. Prefill FLOPs: the same convention, forward only.
Parameters: trainable (query transformer + LLM) and total.

Peak: the best float32 matmul rate of jax, numpy and torch on this machine at the
shape's own matmuls and 2048^3 (`bench.common.model_shapes`), measured in every
process; MFU = model FLOPs / step time / the best of them over the run, named in the
output. Busy machine: a round where other processes used more than 10% of the CPUs
or the peak moved more than 10%, and `bench.common.MachineWatch` over the whole run.
"""
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
from absl import app
from absl import flags

from bench import common

SHAPES = {
    # vision: image, patch, width, layers, heads; query: M, heads; llm: width, layers,
    # heads, kv heads, mlp, vocab.
    "tiny": dict(image=32, patch=4, v_width=64, v_layers=2, v_heads=4, M=16, q_heads=4,
                 width=128, layers=2, heads=4, kv_heads=2, mlp=256, vocab=1000),
    "medium": dict(image=96, patch=8, v_width=256, v_layers=4, v_heads=4, M=64, q_heads=4,
                   width=768, layers=12, heads=12, kv_heads=12, mlp=2048, vocab=8000),
}

_SHAPES = flags.DEFINE_list("shapes", ["tiny", "medium"], f"Of {sorted(SHAPES)}.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (each runs both sides once).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per side and round.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per step.")
_TEXT = flags.DEFINE_integer("text_len", 192, "Text tokens per row (placeholder included).")
_THREADS = flags.DEFINE_integer("threads", 0, "CPU threads for each side (0: all cores).")
_WHAT = flags.DEFINE_list("what", ["step", "prefill"], "Of step, prefill.")
_PREFILL_BATCHES = flags.DEFINE_list("prefill_batches", ["1", "8"], "Prefill batch sizes.")
_PREFILL_RUNS = flags.DEFINE_integer("prefill_runs", 5, "Timed prefill calls per (batch, m) "
                                     "per side and round.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Prefill: cache room for new tokens.")
_BUCKETS = flags.DEFINE_bool("buckets", True, "jax step: one compiled step per power-of-two "
                              "bucket of m (cost follows m); else one step of all M slots.")
_SIDE = flags.DEFINE_enum("side", "", ["", "jax", "torch"], "Internal: run one side.")
_KIND = flags.DEFINE_enum("kind", "step", ["step", "prefill"], "Internal: what --side times.")
_SHAPE = flags.DEFINE_string("shape", "", "Internal: the shape of --side (bench.profile_step: "
                             "the shape it profiles).")
_ROUND = flags.DEFINE_integer("round", 0, "Internal: the round of --side (seeds the m's).")
_JSON = common.define_json_flag()
TRAIN = ("query", "llm")  # The parts that train (the paper's stage 2).


# ---------------------------------------------------------------------------
# Shared by both sides.

def hf_configs(s: dict):
  # pylint: disable-next=import-outside-toplevel
  from transformers import CLIPVisionConfig, LlamaConfig
  clip = CLIPVisionConfig(hidden_size=s["v_width"], intermediate_size=4 * s["v_width"],
                          num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                          image_size=s["image"], patch_size=s["patch"], hidden_act="quick_gelu",
                          layer_norm_eps=1e-5)
  llm = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["width"], intermediate_size=s["mlp"],
                    num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                    num_key_value_heads=s["kv_heads"], rms_norm_eps=1e-5,
                    max_position_embeddings=1024, tie_word_embeddings=False,
                    attn_implementation="eager")
  return clip, llm


def model_config(s: dict):
  """The project's ModelConfig of the same shapes."""
  from mqt import convert  # pylint: disable=import-outside-toplevel
  from mqt.model import ModelConfig, QueryConfig  # pylint: disable=import-outside-toplevel
  clip, llm = hf_configs(s)
  return ModelConfig(vision=convert.vision_config_from_hf(clip.to_dict()),
                     query=QueryConfig(variant="official", num_queries=s["M"],
                                       width=s["v_width"], heads=s["q_heads"],
                                       out_dim=s["width"]),
                     llm=convert.llama_config_from_hf(llm.to_dict()))


def m_sequence(s: dict, round_: int, n: int) -> list[int]:
  """The m of each step (the untimed first one included): uniform over 1..M."""
  return [int(m) for m in np.random.default_rng([7, round_]).integers(1, s["M"] + 1, n + 1)]


def model_flops(s: dict, m: int, batch: int, text_len: int) -> int:
  """Model FLOPs of one step at m (module docstring)."""
  return common.model_flops(model_config(s), text_len, m, batch, TRAIN)["total"]


def stage2_optimizer(cfg):
  """(tx, labels, abstract params) of the stage-2 optimizer (query transformer + LLM)."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from mqt import config_lib, optim  # pylint: disable=import-outside-toplevel
  from mqt.model import abstract_params  # pylint: disable=import-outside-toplevel
  block = config_lib.stage_block(steps=1000, lr=2e-5, rules=config_lib.STAGE2_RULES,
                                 matryoshka_kind="uniform", data=None)
  abstract = nn.unbox(abstract_params(cfg)["params"])
  tx, labels, _ = optim.make_optimizer(abstract, block.optim, 1000)
  return tx, labels, abstract


def param_counts(s: dict) -> dict:
  """{"trainable", "total"} parameters of the jax side at shape s."""
  _, labels, abstract = stage2_optimizer(model_config(s))
  return common.param_counts(abstract, labels)


def tokens(batch: int, text_len: int):
  """(ids, labels) [batch, text_len] numpy, placeholder id -200 at position 1."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 900, (batch, text_len)).astype(np.int64)
  ids[:, 1] = -200
  labels = np.where(np.arange(text_len) >= text_len // 2, ids, -100)
  return ids, labels


def matmul_peaks(s: dict, rows: int, repeats: int = 5) -> dict:
  """Best float32 matmul rates (FLOP/s) in this process at the shape's matmuls of `rows`
  tokens and 2048^3: {"jax", "numpy", "torch": best rate, "rates": every rate}."""
  backends = ("jax", "numpy", "torch")
  rates = common.matmul_rates(common.model_shapes(model_config(s), rows), repeats, backends)
  out = {b: max(x["flops_per_s"] for x in rates if x["backend"] == b) for b in backends}
  return {**out, "rates": rates}


# ---------------------------------------------------------------------------
# One side in this process.

def jax_step(s: dict, batch: int, text_len: int, buckets: bool):
  """The project's stage-2 step at shape s: a namespace of step(state, batch, m) (m run
  in its bucket's jitted step), state, batch (on device), bucket_of(m) and
  hlo(state, batch, m) (the optimized HLO text of m's step)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from mqt import matryoshka  # pylint: disable=import-outside-toplevel
  from mqt.model import IGNORE, MQTLLaVA  # pylint: disable=import-outside-toplevel
  from mqt.params import state_initializer  # pylint: disable=import-outside-toplevel
  from mqt.train_step import make_train_step  # pylint: disable=import-outside-toplevel
  cfg = model_config(s)
  model = MQTLLaVA(cfg)
  tx, labels, _ = stage2_optimizer(cfg)
  ids, lab = tokens(batch, text_len)
  size = cfg.vision.image_size
  images = np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32)
  b = {"images": images, "input_ids": ids.astype(np.int32),
       "text_mask": np.ones(ids.shape, bool),
       "labels": np.where(lab < 0, IGNORE, lab).astype(np.int32)}
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images[:1], b["input_ids"][:1],
                                               b["text_mask"][:1], 1))["params"])()
  state = state_initializer(tx, labels)(params)
  sizes = matryoshka.pow2_buckets(s["M"]) if buckets else (s["M"],)
  sampler = matryoshka.MSampler("uniform", s["M"], buckets=sizes)
  steps = {n: jax.jit(make_train_step(model, tx, labels, 1, num_latents=n),
                      donate_argnums=(0,)) for n in sampler.buckets}

  def step(state, batch, m: int):
    return steps[sampler.bucket([m])](state, batch, jnp.asarray([m], jnp.int32))

  def hlo(state, batch, m: int) -> str:
    ms = jnp.asarray([m], jnp.int32)
    return steps[sampler.bucket([m])].lower(state, batch, ms).compile().as_text()

  return types.SimpleNamespace(step=step, state=state, batch=jax.device_put(b),
                               bucket_of=lambda m: sampler.bucket([m]), hlo=hlo)


def run_jax(s: dict, ms: list[int], batch: int, text_len: int) -> list[float]:
  import jax  # pylint: disable=import-outside-toplevel
  run = jax_step(s, batch, text_len, _BUCKETS.value)
  step, state, b = run.step, run.state, run.batch
  for m in sorted({run.bucket_of(m) for m in ms}):  # Compiles every bucket used first.
    state, out = step(state, b, m)
  jax.block_until_ready(out["loss"])
  times = []
  for k, m in enumerate(ms):
    t = time.perf_counter()
    state, out = step(state, b, m)
    jax.block_until_ready(out["loss"])
    if k:
      times.append(time.perf_counter() - t)
  return times


def torch_modules(s: dict):
  """(torch, tests.torch_reference, HF CLIP, HF LLaMA, the reference query transformer)
  at shape s, built in that order after seeding torch with 0."""
  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from transformers import CLIPVisionModel, LlamaForCausalLM
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests import torch_reference as ref  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  clip_cfg, llm_cfg = hf_configs(s)
  clip = CLIPVisionModel(clip_cfg)
  llm = LlamaForCausalLM(llm_cfg)
  query = ref.RefQueryTransformer(s["v_width"], s["q_heads"], s["width"], s["M"])
  return torch, ref, clip, llm, query


def run_torch(s: dict, ms: list[int], batch: int, text_len: int) -> list[float]:
  torch, ref, clip, llm, query = torch_modules(s)
  with torch.no_grad():
    for p in query.parameters():
      p.normal_(0, 0.02)
  model = ref.RefMQTLLaVA(clip, query, llm).train()
  for p in clip.parameters():
    p.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  ids, lab = tokens(batch, text_len)
  ids_t = [torch.from_numpy(x) for x in ids]
  lab_t = [torch.from_numpy(y) for y in lab]
  size = s["image"]
  pixels = torch.from_numpy(np.random.default_rng(1).normal(
      size=(batch, 3, size, size)).astype(np.float32))
  times = []
  for k, m in enumerate(ms):
    t = time.perf_counter()
    _, loss, _ = model(pixels, ids_t, lab_t, m)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if k:
      times.append(time.perf_counter() - t)
  return times


def prefill_ms(s: dict) -> list[int]:
  return sorted({1, 16, s["M"]} & set(range(1, s["M"] + 1)))


def prefill_inputs(s: dict, batch: int, text_len: int):
  """(images [B, H, W, 3] float32, ids [B, T] int64 with the placeholder at 1)."""
  rng = np.random.default_rng(2)
  ids = rng.integers(3, 900, (batch, text_len)).astype(np.int64)
  ids[:, 1] = -200
  images = rng.normal(size=(batch, s["image"], s["image"], 3)).astype(np.float32)
  return images, ids


def run_jax_prefill(s: dict, batches, runs: int, text_len: int, max_new: int) -> dict:
  """{"batch/m": [seconds]}: `mqt.generate.prefill` with num_latents=m (one program per
  m), the last position's logits and a cache of S + max_new slots."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from mqt import generate as gen  # pylint: disable=import-outside-toplevel
  from mqt.model import MQTLLaVA  # pylint: disable=import-outside-toplevel
  cfg = model_config(s)
  model = MQTLLaVA(cfg)
  fn = jax.jit(gen.prefill, static_argnames=("model", "max_new_tokens", "num_latents"))
  calls = {}
  for batch in batches:
    images, ids = prefill_inputs(s, batch, text_len)
    ids = ids.astype(np.int32)
    mask = np.ones(ids.shape, bool)
    if not calls:
      params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images[:1], ids[:1],
                                                   mask[:1], 1))["params"])()
    args = jax.device_put((images, ids, mask))
    for m in prefill_ms(s):
      calls[f"{batch}/{m}"] = (lambda a=args, m=m: fn(model, params, *a, m,
                                                      max_new_tokens=max_new, num_latents=m))
  return common.time_rounds(
      {k: (lambda c=c: jax.block_until_ready(c())) for k, c in calls.items()}, runs)


def run_torch_prefill(s: dict, batches, runs: int, text_len: int, max_new: int) -> dict:
  """The same under torch.inference_mode: CLIP's second-last layer, the query
  transformer over m latents, LLaVA's splice, HF LLaMA with its cache and the last
  position's logits."""
  del max_new  # HF's dynamic cache holds exactly the prompt.
  torch, _, clip, llm, query = torch_modules(s)
  clip, llm, query = clip.eval(), llm.eval(), query.eval()
  embed = llm.get_input_embeddings()

  def prefill(pixels, ids, m):
    with torch.inference_mode():
      hidden = clip(pixels, output_hidden_states=True).hidden_states[-2]
      vis = query(hidden[:, 1:], m)
      x = torch.cat([embed(ids[:, :1]), vis, embed(ids[:, 2:])], dim=1)
      return llm(inputs_embeds=x, use_cache=True, logits_to_keep=1).logits

  calls = {}
  for batch in batches:
    images, ids = prefill_inputs(s, batch, text_len)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids_t = torch.from_numpy(ids)
    for m in prefill_ms(s):
      calls[f"{batch}/{m}"] = lambda p=pixels, i=ids_t, m=m: prefill(p, i, m)
  return common.time_rounds(calls, runs)


def child() -> None:
  s = SHAPES[_SHAPE.value]
  peaks = matmul_peaks(s, _BATCH.value * (_TEXT.value + s["M"] - 1))
  if _KIND.value == "prefill":
    run = run_jax_prefill if _SIDE.value == "jax" else run_torch_prefill
    times = run(s, [int(b) for b in _PREFILL_BATCHES.value], _PREFILL_RUNS.value,
                _TEXT.value, _MAX_NEW.value)
    print("RESULT " + json.dumps({"prefill": times, "peaks": peaks}), flush=True)
    return
  ms = m_sequence(s, _ROUND.value, _STEPS.value)
  run = run_jax if _SIDE.value == "jax" else run_torch
  times = run(s, ms, _BATCH.value, _TEXT.value)
  print("RESULT " + json.dumps({"times": times, "ms": ms[1:], "peaks": peaks}), flush=True)


# ---------------------------------------------------------------------------
# The driver.

def spawn(side: str, shape: str, round_: int, kind: str = "step") -> dict:
  """Runs one side in a fresh process; -> its result plus `others` (the share of the
  machine's CPU other processes used meanwhile)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  threads = _THREADS.value or os.cpu_count()
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  cmd = [sys.executable, "-m", "bench.vs_torch", f"--side={side}", f"--shape={shape}",
         f"--round={round_}", f"--steps={_STEPS.value}", f"--batch={_BATCH.value}",
         f"--text_len={_TEXT.value}", f"--threads={threads}", f"--kind={kind}",
         f"--buckets={_BUCKETS.value}", f"--prefill_runs={_PREFILL_RUNS.value}",
         f"--prefill_batches={','.join(_PREFILL_BATCHES.value)}",
         f"--max_new_tokens={_MAX_NEW.value}"]
  before = common.snapshot(ref_s=0.0)  # CPU counters only; the child's time is ours.
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
  after = common.snapshot(ref_s=0.0)
  if proc.returncode:
    raise RuntimeError(f"{side} {shape} failed:\n{proc.stderr[-3000:]}")
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  out["others"] = common.others_share(before, after) or 0.0
  return out


def _rounds(shape: str, kind: str) -> tuple[dict, dict, list[str]]:
  """Runs both sides --rounds times, alternating which goes first; -> (results, the
  best matmul rate of the run (`common.pick_peak`), busy flags)."""
  results, peaks, flagged = {"jax": [], "torch": []}, [], []
  for r in range(_ROUNDS.value):
    for side in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
      out = spawn(side, shape, r, kind)
      results[side].append(out)
      peaks.append(common.pick_peak(out["peaks"]["rates"]))
      if out["others"] > common.OTHERS_TOLERANCE:
        flagged.append(f"round {r} {side}: other processes used {out['others']:.0%} of the CPU")
      took = (f"median step {np.median(out['times']) * 1e3:.1f} ms" if kind == "step" else
              "prefill " + ", ".join(f"{k} {np.median(v) * 1e3:.1f} ms"
                                     for k, v in out["prefill"].items()))
      print(f"  {shape} {kind} round {r} {side}: {took}, others {out['others']:.1%}, peaks "
            + ", ".join(f"{b} {out['peaks'][b] / 1e9:.0f}" for b in ("jax", "numpy", "torch"))
            + " GFLOP/s", flush=True)
  rates = [p["flops_per_s"] for p in peaks]
  if min(rates) < 0.9 * max(rates):
    flagged.append(f"the matmul peak moved from {min(rates) / 1e9:.0f} to "
                   f"{max(rates) / 1e9:.0f} GFLOP/s")
  return results, max(peaks, key=lambda p: p["flops_per_s"]), flagged


def step_row(shape: str) -> dict:
  s = SHAPES[shape]
  results, peak, flagged = _rounds(shape, "step")
  row = {"shape": shape, "peak": peak["flops_per_s"], "peak_label": peak["label"],
         "busy": flagged, "params": param_counts(s)}
  for side in ("jax", "torch"):
    times = [t for out in results[side] for t in out["times"]]
    ms = [m for out in results[side] for m in out["ms"]]
    fl = [model_flops(s, m, _BATCH.value, _TEXT.value) for m in ms]
    row[side] = {"step_s": float(np.median(times)),
                 "mfu": float(np.sum(fl) / np.sum(times) / row["peak"]),
                 "gflop_per_step": float(np.mean(fl)) / 1e9}
  return row


def prefill_rows(shape: str) -> tuple[list[dict], list[str]]:
  """One row per (batch, m): both sides' median latency and MFU, the FLOP ratio to m = M."""
  s = SHAPES[shape]
  results, peak, flagged = _rounds(shape, "prefill")
  cfg = model_config(s)
  med = {side: {k: float(np.median([t for out in results[side] for t in out["prefill"][k]]))
                for k in results[side][0]["prefill"]} for side in results}
  rows = []
  for key in med["jax"]:
    batch, m = (int(x) for x in key.split("/"))
    fl = lambda n: common.model_flops(cfg, _TEXT.value, n, batch)["total"]
    full = f"{batch}/{s['M']}"
    rows.append({"shape": shape, "batch": batch, "m": m, "jax_s": med["jax"][key],
                 "torch_s": med["torch"][key], "lat_ratio": med["jax"][key] / med["jax"][full],
                 "flop_ratio": fl(m) / fl(s["M"]), "gflop": fl(m) / 1e9,
                 "jax_mfu": fl(m) / med["jax"][key] / peak["flops_per_s"],
                 "torch_mfu": fl(m) / med["torch"][key] / peak["flops_per_s"],
                 "peak": peak["flops_per_s"], "peak_label": peak["label"]})
  return rows, flagged


def print_steps(steps) -> None:
  print(f"\n{'shape':<8}{'trainable/total params':>24}{'jax ms':>10}{'torch ms':>10}"
        f"{'jax/torch':>11}{'GFLOP/step':>12}{'jax MFU':>9}{'torch MFU':>11}"
        f"{'peak GFLOP/s':>14}  peak")
  for row in steps:
    j, t, n = row["jax"], row["torch"], row["params"]
    counts = f"{n['trainable']:,}/{n['total']:,}"
    print(f"{row['shape']:<8}{counts:>24}"
          f"{j['step_s'] * 1e3:>10.1f}{t['step_s'] * 1e3:>10.1f}"
          f"{j['step_s'] / t['step_s']:>11.2f}{j['gflop_per_step']:>12.2f}{j['mfu']:>9.1%}"
          f"{t['mfu']:>11.1%}{row['peak'] / 1e9:>14.0f}  {row['peak_label']}")
  print(f"FLOPs: {common.CONVENTION} at each step's m (bench/common.py: query transformer + "
        "LLM 3x forward, frozen vision forward only, causal attention halved); MFU against "
        "the best float32 matmul of jax, numpy or torch measured in the run (peak).")


def print_prefills(prefills) -> None:
  print(f"\n{'shape':<8}{'batch':>6}{'m':>4}{'jax ms':>9}{'torch ms':>10}{'jax/torch':>11}"
        f"{'GFLOP':>8}{'jax MFU':>9}{'torch MFU':>11}{'lat/lat(M)':>12}{'FLOP/FLOP(M)':>14}"
        f"{'off by':>8}")
  for r in prefills:
    print(f"{r['shape']:<8}{r['batch']:>6}{r['m']:>4}{r['jax_s'] * 1e3:>9.2f}"
          f"{r['torch_s'] * 1e3:>10.2f}{r['jax_s'] / r['torch_s']:>11.2f}{r['gflop']:>8.2f}"
          f"{r['jax_mfu']:>9.1%}{r['torch_mfu']:>11.1%}{r['lat_ratio']:>12.2f}"
          f"{r['flop_ratio']:>14.2f}{r['lat_ratio'] / r['flop_ratio'] - 1:>+8.0%}")
  print("Prefill: the vision tower, the query transformer at m and the LLM over T + m - 1 "
        f"positions with its cache, last position's logits; FLOPs: {common.CONVENTION}, "
        "forward. off by: the jax latency ratio to m = M over the FLOP ratio, minus 1.")


def main(argv):
  del argv
  if _SIDE.value:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(_THREADS.value or os.cpu_count())
    child()
    return
  watch = common.MachineWatch().start()
  print(f"{os.cpu_count()} CPUs; batch {_BATCH.value}, {_TEXT.value} text tokens, "
        f"{_ROUNDS.value} rounds x {_STEPS.value} timed steps per side; jax step "
        f"{'in power-of-two m buckets' if _BUCKETS.value else 'over all M slots'}", flush=True)
  steps, prefills, busy = [], [], []
  for shape in _SHAPES.value:
    if "step" in _WHAT.value:
      steps.append(step_row(shape))
      busy += [f"{shape} step: {x}" for x in steps[-1]["busy"]]
    if "prefill" in _WHAT.value:
      rows, flagged = prefill_rows(shape)
      prefills += rows
      busy += [f"{shape} prefill: {x}" for x in flagged]
  record = watch.stop()
  if steps:
    print_steps(steps)
  if prefills:
    print_prefills(prefills)
  if busy and not record["busy"]:
    record.update(busy=True, verdict="busy machine")
  record["busy_reasons"] += busy
  common.finish(record, _JSON(), steps=steps, prefill=prefills)


if __name__ == "__main__":
  app.run(main)
