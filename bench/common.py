r"""What every speed benchmark here shares: one FLOP convention, a measured peak, and a
check that the machine was quiet while it ran.

FLOPs: "MaxText model FLOPs" (the convention of MaxText's
`calculate_tflops_training_per_device`), per step or call, from the shapes alone:
matrix products only, a multiply-add = 2 FLOPs, at the sequence length the work
needs (S = T + m - 1 for m visual tokens; `padded=True` gives the cost at the
length a padded program runs, T + M - 1, with all M latents).
  forward       2 N per token for the matmul parameters N a token meets (patch
                conv, projections, MLPs, the LM head), plus attention: QK^T and AV,
                4 * q_len * k_len * heads * head_dim per example and layer. Causal
                attention (the LLM) is halved (S^2 / 2 score pairs); the vision
                tower's and the query transformer's attention is full. Not counted:
                embedding lookups, norms, softmax, activations, masks, residuals.
  training      per part of the model (vision tower, query transformer, LLM, in
                the order data flows): a trainable part costs 3x its forward
                (6 N per token: forward, activation gradient, weight gradient; its
                attention 3x). A frozen part that the gradient passes through (a
                trainable part comes before it, as the LLM in the paper's stage 1)
                costs 2x on its matmul parameters (forward + activation gradient, no
                weight gradient) and 3x on its attention. A frozen part before every
                trainable one (the tower in stage 2) runs forward only: 1x. The LM
                head runs at every position but the last (S - 1 rows) in training,
                at one position per row in the prefill. As MaxText, the activation
                gradient of a trainable part's first layer is counted though autodiff
                skips it.
Per part, the forward matmul FLOPs come from `mqt.flops` (vision_flops, query_flops,
llm_prefill_flops), which counts exactly the dot and convolution FLOPs of the compiled
programs; only the attention split and the causal half are added here.

Peak: the best float32 matmul rate measured in the same run (before and after the timed
work), the maximum over jax (XLA's dot) and numpy (its BLAS) at the model's own matmul
shapes and a 2048^3 square; MFU = model FLOPs / time / that peak, and the output names
which one it was.

Busy machine: `MachineWatch` records the 1-minute load average and the median time of
a reference matmul (jax, 1024^3) before and after a benchmark, and the CPU time other
processes used meanwhile (/proc/stat less this process's own). `busy_reasons` says
"busy machine" when the load average exceeds cores - 0.5 (after the run: less this
process's own share of it), the reference time moved by more than 10%, or other
processes used more than 10% of the machine's CPU time.
"""
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import sys
import time

import jax
import numpy as np
from absl import flags
from flax import linen as nn
from flax import traverse_util

from mqt import flops
from mqt import optim
from mqt.model import MQTLLaVA, ModelConfig, dummy_inputs

PARTS = ("vision", "query", "llm")  # The order data flows through the model.
CONVENTION = "MaxText model FLOPs"
SQUARE = (2048, 2048, 2048)
LOAD_MARGIN = 0.5  # Busy: 1-minute load average above cores - LOAD_MARGIN.
REF_TOLERANCE = 0.10  # Busy: the reference matmul's time moved by more than this.
OTHERS_TOLERANCE = 0.10  # Busy: other processes used more than this share of the CPU.


# ---------------------------------------------------------------------------
# FLOPs.

def _attention(q_len: int, k_len: int, heads: int, head_dim: int) -> int:
  """QK^T and AV for one example and layer: 2 products of 2 * q * k * heads * head_dim."""
  return 4 * q_len * k_len * heads * head_dim


def forward_parts(cfg: ModelConfig, seq_len: int, latents: int, batch: int,
                  head_rows: int) -> dict:
  """Forward FLOPs per part: {part: (parameter matmuls, attention)} for `batch` rows of
  `seq_len` LLM slots, `latents` query latents and the LM head at `head_rows` per row."""
  v, q, c = cfg.vision, cfg.query, cfg.llm
  tokens = flops.num_patches(v) + 1  # The class token runs through the tower.
  patches = flops.num_patches(v) + (1 if v.keep_cls else 0)
  v_att = batch * v.layers_used * _attention(tokens, tokens, v.heads, v.width // v.heads)
  hd = q.width // q.heads
  q_att = _attention(latents, patches, q.heads, hd)
  if q.variant == "perceiver":
    q_att = q.depth * (q_att + _attention(latents, latents, q.heads, hd))
  q_att *= batch
  head = flops.llm_prefill_flops(c, 0, 0, batch)  # The LM head at one row per example.
  layers = flops.llm_prefill_flops(c, seq_len, 0, batch) - head  # No cache: no attention.
  causal = batch * c.depth * _attention(seq_len, seq_len, c.heads, c.head_dim) // 2
  return {
      "vision": (flops.vision_flops(v, batch) - v_att, v_att),
      "query": (flops.query_flops(q, v.width, patches, latents, batch) - q_att, q_att),
      "llm": (layers + head_rows * head, causal),
  }


def model_flops(cfg: ModelConfig, text_len: int, m: int, batch: int, train=(),
                padded: bool = False) -> dict:
  """MaxText model FLOPs (module docstring) of one step (`train`: the parts that train)
  or one prefill (`train` empty: forward only, the LM head at the last position).

  text_len: T, the prompt's tokens with the `<image>` placeholder. padded: the cost at
  the padded length T + M - 1 with all M latents, whatever m is. -> {"vision", "query",
  "llm", "total": ints, "seq_len": S}."""
  unknown = set(train) - set(PARTS)
  if unknown:
    raise ValueError(f"unknown parts {sorted(unknown)}; parts are {PARTS}")
  n = cfg.query.num_queries if padded else m
  if not 1 <= m <= cfg.query.num_queries:
    raise ValueError(f"m={m} is out of range 1..{cfg.query.num_queries}")
  seq = text_len + n - 1
  parts = forward_parts(cfg, seq, n, batch, head_rows=seq - 1 if train else 1)
  out, flows = {}, False
  for part in PARTS:
    dense, att = parts[part]
    trains = part in train
    flows = flows or trains
    out[part] = dense * (1 + flows + trains) + att * (3 if flows else 1)
  out["total"] = sum(out[p] for p in PARTS)
  out["seq_len"] = seq
  return out


def decode_flops(cfg: ModelConfig, context: int, batch: int) -> int:
  """MaxText model FLOPs of one decoded token per row: 2 N for the LLM's matmul
  parameters and the LM head, attention of one query over `context` positions."""
  return flops.llm_decode_flops(cfg.llm, context, batch)


def trainable_parts(labels, train_vision: bool = True) -> tuple[str, ...]:
  """The parts (PARTS) whose parameters train under optimizer labels (`optim.param_labels`);
  a part where only some parameters train is an error (the convention counts weight
  gradients per part). train_vision=False: the model stops the tower's gradient."""
  flat = traverse_util.flatten_dict(labels, sep="/")
  out = []
  for part in PARTS:
    mine = [v != optim.FROZEN for k, v in flat.items() if k.split("/")[0] == part]
    if any(mine) and not all(mine):
      raise ValueError(f"only some of {part}'s parameters train: the FLOP convention "
                       "counts weight gradients per part")
    if mine and all(mine) and (part != "vision" or train_vision):
      out.append(part)
  return tuple(out)


def param_counts(params, labels) -> dict:
  """{"total", "trainable"}: parameters (all leaves, embedding tables and norms included)
  and those the optimizer labels train."""
  flat = traverse_util.flatten_dict(params, sep="/")
  kinds = traverse_util.flatten_dict(labels, sep="/")
  sizes = {k: math.prod(getattr(x, "shape", ())) for k, x in flat.items()}
  return {"total": sum(sizes.values()),
          "trainable": sum(n for k, n in sizes.items() if kinds[k] != optim.FROZEN)}


# ---------------------------------------------------------------------------
# Timing and peak.

def random_prefill_setup(cfg: ModelConfig, batch: int, text_len: int):
  """-> (model, random params, images, prompt ids, mask) on the device: a prefill's
  inputs at [batch, text_len], the <image> placeholder second, seeded."""
  model = MQTLLaVA(cfg)
  images, ids, mask = dummy_inputs(cfg)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images, ids, mask,
                                               cfg.query.num_queries))["params"])()
  rng = np.random.default_rng(0)
  s = cfg.vision.image_size
  images = rng.normal(size=(batch, s, s, cfg.vision.channels)).astype(np.float32)
  ids = rng.integers(3, cfg.llm.vocab_size, (batch, text_len)).astype(np.int32)
  ids[:, 1] = cfg.image_token_id
  mask = np.ones((batch, text_len), bool)
  return (model, params, *jax.device_put((images, ids, mask)))


def time_rounds(calls: dict, runs: int) -> dict:
  """{name: [seconds]}: warms every call once, then times each once per round over `runs`
  rounds (load from elsewhere falls on every call alike)."""
  for c in calls.values():
    c()
  times = {k: [] for k in calls}
  for _ in range(runs):
    for k, c in calls.items():
      t = time.perf_counter()
      c()
      times[k].append(time.perf_counter() - t)
  return times


def model_shapes(cfg: ModelConfig, rows: int) -> list[tuple[int, int, int]]:
  """(rows, k, n) of the LLM's largest matmuls at `rows` tokens, and the square."""
  c = cfg.llm
  return sorted({(rows, c.width, c.mlp_dim), (rows, c.width, c.heads * c.head_dim), SQUARE})


def _best_time(fn, repeats: int, least_s: float = 0.01) -> float:
  """Seconds per call: the best of `repeats` timings, each of enough back-to-back calls
  to last `least_s` (a small matmul timed alone is mostly timer noise)."""
  t = time.perf_counter()
  fn()
  calls = max(1, math.ceil(least_s / max(time.perf_counter() - t, 1e-7)))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(calls):
      fn()
    best = min(best, (time.perf_counter() - t) / calls)
  return best


def matmul_rates(shapes, repeats: int = 5, backends=("jax", "numpy")) -> list[dict]:
  """Best float32 rate (FLOP/s) of a matmul at each (rows, k, n) per backend (jax, numpy,
  torch)."""
  rng = np.random.default_rng(0)
  out = []
  for rows, k, n in shapes:
    a = rng.standard_normal((rows, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    calls = {"numpy": lambda: np.matmul(a, b)}
    if "jax" in backends:
      f = jax.jit(lambda x, y: x @ y)
      ja, jb = jax.device_put((a, b))
      calls["jax"] = lambda: f(ja, jb).block_until_ready()
    if "torch" in backends:
      import torch  # pylint: disable=import-outside-toplevel
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      calls["torch"] = lambda: torch.mm(ta, tb)
    for backend in backends:
      out.append({"backend": backend, "shape": [rows, k, n],
                  "flops_per_s": 2 * rows * k * n / _best_time(calls[backend], repeats)})
  return out


def pick_peak(rates: list[dict]) -> dict:
  """The fastest of `matmul_rates`' entries, with a label naming it."""
  if not rates:
    raise ValueError("no matmul rates to pick a peak from")
  best = max(rates, key=lambda r: r["flops_per_s"])
  label = f"{best['backend']} {'x'.join(str(d) for d in best['shape'])}"
  return {**best, "label": label, "rates": rates}


def measure_peak(shapes, repeats: int = 5, earlier: dict | None = None) -> dict:
  """`pick_peak(matmul_rates(shapes))`, the peak MFU divides by; with `earlier` (a peak
  measured before the benchmark) the best of both measurements."""
  return pick_peak(matmul_rates(shapes, repeats) + (earlier["rates"] if earlier else []))


def peak_line(peak: dict) -> str:
  """The peak and the best rate of every (backend, shape) measured, in GFLOP/s."""
  best = {}
  for r in peak["rates"]:
    key = f"{r['backend']} {'x'.join(map(str, r['shape']))}"
    best[key] = max(best.get(key, 0.0), r["flops_per_s"])
  others = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in best.items())
  return (f"peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s float32 ({peak['label']}; "
          f"each, GFLOP/s: {others})")


# ---------------------------------------------------------------------------
# Busy machine.

def reference_matmul_s(n: int = 1024, repeats: int = 15) -> float:
  """Median seconds of a jax float32 n^3 matmul (after 5 warm-up calls)."""
  x = jax.device_put(np.random.default_rng(1).standard_normal((n, n), np.float32))
  f = jax.jit(lambda a: a @ a)
  for _ in range(5):
    f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _cpu_seconds() -> tuple[float, float]:
  """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
  try:
    with open("/proc/stat") as f:
      parts = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return 0.0, 0.0
  tick = os.sysconf("SC_CLK_TCK")
  idle = parts[3] + parts[4]
  return (sum(parts) - idle) / tick, sum(parts) / tick


def _own_cpu_s() -> float:
  """CPU seconds of this process and its finished children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def snapshot(ref_s: float | None = None) -> dict:
  """The machine now: load1, ref_s (reference matmul), wall, own CPU and /proc/stat time."""
  ref_s = reference_matmul_s() if ref_s is None else ref_s
  busy, total = _cpu_seconds()
  return {"load1": os.getloadavg()[0], "ref_s": ref_s, "wall": time.time(),
          "own_cpu_s": _own_cpu_s(), "cpu_busy_s": busy, "cpu_total_s": total}


def own_load(before: dict, after: dict) -> float:
  """This process's estimated share of the 1-minute load average at `after`: its mean
  busy cores over the run, weighted as the kernel's exponential average weights them."""
  wall = max(after["wall"] - before["wall"], 1e-9)
  rate = (after["own_cpu_s"] - before["own_cpu_s"]) / wall
  return rate * (1 - math.exp(-wall / 60))


def others_share(before: dict, after: dict) -> float | None:
  """The share of the machine's CPU time other processes used between two snapshots."""
  total = after["cpu_total_s"] - before["cpu_total_s"]
  if total <= 0:
    return None
  busy = after["cpu_busy_s"] - before["cpu_busy_s"]
  return max(0.0, busy - (after["own_cpu_s"] - before["own_cpu_s"])) / total


def busy_reasons(before: dict, after: dict, cores: int) -> list[str]:
  """Why the run was not on a quiet machine ([] when it was); snapshots from `snapshot`."""
  limit = cores - LOAD_MARGIN
  reasons = []
  if before["load1"] > limit:
    reasons.append(f"load average {before['load1']:.2f} before > {limit:g}")
  mine = own_load(before, after)
  if after["load1"] - mine > limit:
    reasons.append(f"load average {after['load1']:.2f} after ({mine:.2f} of it this "
                   f"process) > {limit:g}")
  change = after["ref_s"] / before["ref_s"] - 1
  if abs(change) > REF_TOLERANCE:
    reasons.append(f"reference matmul {before['ref_s'] * 1e3:.1f} -> "
                   f"{after['ref_s'] * 1e3:.1f} ms ({change:+.0%})")
  others = others_share(before, after)
  if others is not None and others > OTHERS_TOLERANCE:
    reasons.append(f"other processes used {others:.0%} of the CPU")
  return reasons


def machine_name() -> str:
  """E.g. '2-core CPU (model name), jax cpu'."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{os.cpu_count()}-core CPU ({model}), jax {jax.default_backend()}"


@dataclasses.dataclass
class MachineWatch:
  """Records the machine around a benchmark: `start()`, run, `stop()`, then `record`."""
  before: dict | None = None
  after: dict | None = None

  def start(self) -> "MachineWatch":
    self.before = snapshot()
    return self

  def stop(self) -> dict:
    self.after = snapshot()
    return self.record

  @property
  def record(self) -> dict:
    reasons = busy_reasons(self.before, self.after, os.cpu_count())
    others = others_share(self.before, self.after)
    return {"machine": machine_name(), "date": datetime.date.today().isoformat(),
            "busy": bool(reasons), "verdict": "busy machine" if reasons else "quiet machine",
            "busy_reasons": reasons, "load1_before": self.before["load1"],
            "load1_after": self.after["load1"], "own_load": own_load(self.before, self.after),
            "ref_ms_before": self.before["ref_s"] * 1e3,
            "ref_ms_after": self.after["ref_s"] * 1e3, "others_cpu_share": others,
            "wall_s": self.after["wall"] - self.before["wall"]}


def machine_lines(record: dict) -> str:
  """Two lines for under a table: the machine and date, then the busy verdict."""
  others = record["others_cpu_share"]
  head = (f"{record['machine']}, {record['date']}, {record['wall_s']:.0f} s; load average "
          f"{record['load1_before']:.2f} -> {record['load1_after']:.2f} (this process "
          f"~{record['own_load']:.2f}), reference matmul {record['ref_ms_before']:.1f} -> "
          f"{record['ref_ms_after']:.1f} ms, other processes "
          f"{'n/a' if others is None else f'{others:.0%}'} of the CPU")
  verdict = record["verdict"]
  if record["busy_reasons"]:
    verdict += ": " + "; ".join(record["busy_reasons"])
  return head + "\n" + verdict


def finish(record: dict, json_path: str, **payload) -> None:
  """Prints the machine lines under a table and writes `payload` with the machine record
  and the FLOP convention's name to `json_path` (when given)."""
  print(machine_lines(record))
  write_json(json_path, {**payload, "machine": record, "convention": CONVENTION})


def write_json(path: str, payload: dict) -> None:
  """Writes `payload` (with numpy scalars) to `path` when a path is given."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    f.write("\n")
  print(f"wrote {path}")


def define_json_flag():
  """--json_out, defined once whichever benchmarks a program imports (listed by --help
  under the first module that asks for it)."""
  if "json_out" not in flags.FLAGS:
    caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
    flags.DEFINE(flags.ArgumentParser(), "json_out", "", "Also write the results and the "
                 "machine record (busy flag included) as JSON to this file.",
                 module_name=sys.argv[0] if caller == "__main__" else caller)
  return lambda: flags.FLAGS.json_out


# Counting XLA compilations (tests and benchmarks check how often a program compiles).
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations inside the block.

  with count_compiles() as n:
    f(x); f(y)
  n() -> number of compilations (cache hits compile nothing).
  """
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _BACKEND_COMPILE:
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield lambda: count[0]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
