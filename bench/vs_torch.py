r"""The project's train step against an eager PyTorch one of identical shapes.

  python -m bench.vs_torch                                # tiny and medium, 3 rounds
  python -m bench.vs_torch --shapes=tiny --rounds=5 --steps=10

Both sides build the same model from one set of HF configs: HF CLIP (vision
tower, frozen), the official query transformer (tests/torch_reference.py) and
HF LLaMA (eager attention), joined by LLaVA's splice; the query transformer and
the LLM train with AdamW (the paper's stage-2 trainability). Batch `--batch`
rows of `--text_len` text tokens (the `<image>` placeholder at position 1, the
second half labelled). Each step draws its m uniformly from 1..M; both sides
get the same m sequence in a round.

Each round runs the two sides in separate processes, one after the other
(jax first in even rounds, torch first in odd ones): a process builds its
model, runs one untimed step (compilation on the jax side) and times
`--steps` steps. The table gives the median step over all rounds.

FLOPs per step (one convention for both sides, "model FLOPs at m"): matrix
products only (mqt.flops), multiply-add = 2, at the step's own m: the frozen
vision tower's forward once, the query transformer and the LLM forward three
times (forward + backward). The project's step pads every row to T + M - 1
slots whatever m is, so it computes more than this; the table counts only the
model FLOPs at m, the work an eager implementation needs.

Peak: the best float32 2048^3 matmul rate of jax and of torch on this machine,
measured before each round. MFU = model FLOPs / step time / that peak. A round
where other processes used more than 10% of the CPUs (from /proc/stat against
the child's own CPU time) or the peak moved more than 10% is flagged busy.
"""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

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
_SIDE = flags.DEFINE_enum("side", "", ["", "jax", "torch"], "Internal: run one side.")
_SHAPE = flags.DEFINE_string("shape", "", "Internal: the shape of --side.")
_ROUND = flags.DEFINE_integer("round", 0, "Internal: the round of --side (seeds the m's).")


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
  from mqt import flops  # pylint: disable=import-outside-toplevel
  cfg = model_config(s)
  seq = text_len + m - 1
  patches = flops.num_patches(cfg.vision) + (1 if cfg.vision.keep_cls else 0)
  vision = flops.vision_flops(cfg.vision, batch)
  query = flops.query_flops(cfg.query, cfg.vision.width, patches, m, batch)
  llm = flops.llm_prefill_flops(cfg.llm, seq, seq, batch)
  return vision + 3 * (query + llm)


def tokens(batch: int, text_len: int):
  """(ids, labels) [batch, text_len] numpy, placeholder id -200 at position 1."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 900, (batch, text_len)).astype(np.int64)
  ids[:, 1] = -200
  labels = np.where(np.arange(text_len) >= text_len // 2, ids, -100)
  return ids, labels


def matmul_peaks(n: int = 2048, repeats: int = 5) -> dict:
  """Best float32 n^3 matmul rates (FLOP/s) of jax and torch in this process."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  out = {}
  f = jax.jit(lambda x: x @ x)
  x = jnp.asarray(a)
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(repeats))
  out["jax"] = 2 * n ** 3 / best
  t = torch.from_numpy(a)
  torch.mm(t, t)
  best = min(_timed(lambda: torch.mm(t, t)) for _ in range(repeats))
  out["torch"] = 2 * n ** 3 / best
  return out


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


# ---------------------------------------------------------------------------
# One side in this process.

def run_jax(s: dict, ms: list[int], batch: int, text_len: int) -> list[float]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from mqt import config_lib, optim  # pylint: disable=import-outside-toplevel
  from mqt.model import IGNORE, MQTLLaVA, abstract_params  # pylint: disable=import-outside-toplevel
  from mqt.train import make_train_step  # pylint: disable=import-outside-toplevel
  cfg = model_config(s)
  model = MQTLLaVA(cfg)
  block = config_lib.stage_block(steps=1000, lr=2e-5, rules=config_lib.STAGE2_RULES,
                                 matryoshka_kind="uniform", data=None)
  abstract = nn.unbox(abstract_params(cfg)["params"])
  tx, labels, _ = optim.make_optimizer(abstract, block.optim, 1000)
  ids, lab = tokens(batch, text_len)
  size = cfg.vision.image_size
  images = np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32)
  b = {"images": images, "input_ids": ids.astype(np.int32),
       "text_mask": np.ones(ids.shape, bool),
       "labels": np.where(lab < 0, IGNORE, lab).astype(np.int32)}
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images[:1], b["input_ids"][:1],
                                               b["text_mask"][:1], 1))["params"])()
  trainable, _ = optim.partition(params, labels)
  state = {"params": params, "opt_state": tx.init(trainable), "step": jnp.int32(0),
           "rng": jax.random.PRNGKey(0)}
  step = jax.jit(make_train_step(model, tx, labels, 1), donate_argnums=(0,))
  b = jax.device_put(b)
  times = []
  for k, m in enumerate(ms):
    t = time.perf_counter()
    state, out = step(state, b, jnp.asarray([m], jnp.int32))
    jax.block_until_ready(out["loss"])
    if k:
      times.append(time.perf_counter() - t)
  return times


def run_torch(s: dict, ms: list[int], batch: int, text_len: int) -> list[float]:
  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from transformers import CLIPVisionModel, LlamaForCausalLM
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests import torch_reference as ref  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  clip_cfg, llm_cfg = hf_configs(s)
  clip, llm = CLIPVisionModel(clip_cfg), LlamaForCausalLM(llm_cfg)
  query = ref.RefQueryTransformer(s["v_width"], s["q_heads"], s["width"], s["M"])
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


def child() -> None:
  s = SHAPES[_SHAPE.value]
  ms = m_sequence(s, _ROUND.value, _STEPS.value)
  peaks = matmul_peaks()
  run = run_jax if _SIDE.value == "jax" else run_torch
  times = run(s, ms, _BATCH.value, _TEXT.value)
  print("RESULT " + json.dumps({"times": times, "ms": ms[1:], "peaks": peaks}), flush=True)


# ---------------------------------------------------------------------------
# The driver.

def _cpu_jiffies():
  with open("/proc/stat") as f:
    parts = [int(x) for x in f.readline().split()[1:]]
  idle = parts[3] + parts[4]
  return sum(parts) - idle, sum(parts)


def spawn(side: str, shape: str, round_: int) -> dict:
  """Runs one side in a fresh process; -> its result plus `others` (the share of the
  machine's CPU other processes used meanwhile)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  threads = _THREADS.value or os.cpu_count()
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  cmd = [sys.executable, "-m", "bench.vs_torch", f"--side={side}", f"--shape={shape}",
         f"--round={round_}", f"--steps={_STEPS.value}", f"--batch={_BATCH.value}",
         f"--text_len={_TEXT.value}", f"--threads={threads}"]
  busy0, total0 = _cpu_jiffies()
  own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
  busy1, total1 = _cpu_jiffies()
  own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"{side} {shape} failed:\n{proc.stderr[-3000:]}")
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  tick = os.sysconf("SC_CLK_TCK")
  own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
  others = max(0.0, (busy1 - busy0) / tick - own) / max((total1 - total0) / tick, 1e-9)
  out["others"] = others
  return out


def main(argv):
  del argv
  if _SIDE.value:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(_THREADS.value or os.cpu_count())
    child()
    return
  print(f"{os.cpu_count()} CPUs; batch {_BATCH.value}, {_TEXT.value} text tokens, "
        f"{_ROUNDS.value} rounds x {_STEPS.value} timed steps per side", flush=True)
  rows = []
  for shape in _SHAPES.value:
    s = SHAPES[shape]
    results = {"jax": [], "torch": []}
    peaks, flagged = [], []
    for r in range(_ROUNDS.value):
      order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
      for side in order:
        out = spawn(side, shape, r)
        results[side].append(out)
        peaks.append(max(out["peaks"].values()))
        if out["others"] > 0.10:
          flagged.append(f"round {r} {side}: other processes used {out['others']:.0%} of the CPU")
        print(f"  {shape} round {r} {side}: median step "
              f"{np.median(out['times']) * 1e3:.1f} ms, others {out['others']:.1%}, peaks "
              + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in out["peaks"].items()) + " GFLOP/s",
              flush=True)
    peak = max(peaks)
    if min(peaks) < 0.9 * peak:
      flagged.append(f"the matmul peak moved from {min(peaks) / 1e9:.0f} to "
                     f"{peak / 1e9:.0f} GFLOP/s")
    row = {"shape": shape, "peak": peak, "busy": flagged}
    for side in ("jax", "torch"):
      times = [t for out in results[side] for t in out["times"]]
      ms = [m for out in results[side] for m in out["ms"]]
      fl = [model_flops(s, m, _BATCH.value, _TEXT.value) for m in ms]
      row[side] = {"step_s": float(np.median(times)),
                   "mfu": float(np.sum(fl) / np.sum(times) / peak),
                   "gflop_per_step": float(np.mean(fl)) / 1e9}
    rows.append(row)
  print(f"\n{'shape':<8}{'jax ms':>10}{'torch ms':>10}{'jax/torch':>11}{'GFLOP/step':>12}"
        f"{'jax MFU':>9}{'torch MFU':>11}{'peak GFLOP/s':>14}")
  for row in rows:
    j, t = row["jax"], row["torch"]
    print(f"{row['shape']:<8}{j['step_s'] * 1e3:>10.1f}{t['step_s'] * 1e3:>10.1f}"
          f"{j['step_s'] / t['step_s']:>11.2f}{j['gflop_per_step']:>12.2f}{j['mfu']:>9.1%}"
          f"{t['mfu']:>11.1%}{row['peak'] / 1e9:>14.0f}")
    for line in row["busy"]:
      print(f"  busy: {line}")
  print("\nFLOPs: model FLOPs at each step's m (matmuls, multiply-add = 2; frozen vision "
        "forward once, query transformer + LLM x3); MFU against the best float32 matmul "
        "of jax or torch measured here.")


if __name__ == "__main__":
  app.run(main)
