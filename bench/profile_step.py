r"""Where the train step's time goes: an XLA profile of the step, grouped by op.

  python -m bench.profile_step --shape=tiny --m=8     # a shape of bench.vs_torch
  python -m bench.profile_step --shape=medium --m=32 --steps=2 --top=25

Builds the project's stage-2 step at one of `bench.vs_torch`'s shapes (m in its
power-of-two bucket unless --nobuckets), times --steps warmed steps, then runs
--steps more under `jax.profiler.trace` and reads the trace back: every executed
XLA op (on the CPU, one "thunk" each) is matched to its HLO instruction in the
compiled step and so to the model code that made it (the op_name metadata, with
the layer number dropped so that all layers add up). The table lists the
op groups taking the most time per step, forward and backward apart, and the
share of all op time. On the CPU, independent ops run concurrently, so op time
can exceed the step's wall time. The first line also gives the parameters
(trainable / total), the step's MaxText model FLOPs at m (`bench.common.model_flops`)
and its MFU against the best float32 matmul measured before and after; the last
lines say whether the machine was busy (`bench.common.MachineWatch`).
"""
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

from bench import common
from bench import vs_torch

_M = flags.DEFINE_integer("m", 8, "Visual tokens of the profiled steps.")
_TOP = flags.DEFINE_integer("top", 30, "Op groups to list.")
# --shape, --steps, --batch, --text_len and --buckets are bench.vs_torch's flags.

def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata (the jax code that made it)."""
  out = {}
  for line in hlo_text.splitlines():
    found = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if found:
      meta = re.search(r'op_name="([^"]*)"', line)
      out.setdefault(found.group(1), meta.group(1) if meta else "")
  return out


def group_of(op_name: str) -> str:
  """A layer-agnostic label: forward / backward, then the op path after jit(step)."""
  side = "bwd" if "transpose(" in op_name else "fwd"
  path = re.sub(r"layers_\d+", "layers_N", op_name)
  path = re.sub(r"^jit\(step\)/", "", path)
  path = re.sub(r"(transpose\()?jvp\(([^)]*)\)\)?/?", r"\2/", path).strip("/")
  return f"{side} {path or '(no metadata)'}"


COARSE = (  # (substring of the group, part of the model); the first match counts.
    ("head", "LM head + loss"), ("token_nll", "LM head + loss"), ("/vision/", "vision tower"),
    ("/query/", "query transformer"), ("_proj/", "LLM projections + MLP"),
    ("silu", "LLM projections + MLP"), ("bkqh", "LLM attention"), ("bkqs", "LLM attention"),
    ("layers_N/transpose", "LLM attention"), ("layers_N/div", "LLM attention"),
    ("layers_N/reduce_", "LLM attention"), ("layers_N/jit(_where)", "LLM attention"),
    ("layers_N/exp", "LLM attention"), ("layernorm", "LLM norms"), ("llm/norm", "LLM norms"),
    ("layers_N", "LLM other (rope, residuals, reshapes)"), ("embed", "embedding + splice"),
)


def coarse_of(group: str) -> str:
  """The part of the model a group belongs to (COARSE), else "optimizer + other"."""
  return next((part for key, part in COARSE if key in group), "optimizer + other")


def trace_events(folder: str) -> list[dict]:
  files = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {folder}")
  with gzip.open(files[0]) as f:
    events = json.load(f)
  return events["traceEvents"] if isinstance(events, dict) else events


def main(argv):
  del argv
  watch = common.MachineWatch().start()
  shape = vs_torch._SHAPE.value or "tiny"  # pylint: disable=protected-access
  if shape not in vs_torch.SHAPES:
    raise app.UsageError(f"--shape={shape}: choose one of {sorted(vs_torch.SHAPES)}")
  s = vs_torch.SHAPES[shape]
  # pylint: disable-next=protected-access
  steps_n, batch_n, text_n = vs_torch._STEPS.value, vs_torch._BATCH.value, vs_torch._TEXT.value
  buckets = vs_torch._BUCKETS.value  # pylint: disable=protected-access
  if not 1 <= _M.value <= s["M"]:
    raise app.UsageError(f"--m={_M.value} is out of range: 1 <= m <= M={s['M']}")
  run = vs_torch.jax_step(s, batch_n, text_n, buckets)
  step, state, batch, bucket_of = run.step, run.state, run.batch, run.bucket_of
  m = _M.value
  shapes = common.model_shapes(vs_torch.model_config(s), batch_n * (text_n + bucket_of(m) - 1))
  peak = common.measure_peak(shapes)
  state, out = step(state, batch, m)
  jax.block_until_ready(out["loss"])
  times = []
  for _ in range(steps_n):
    t = time.perf_counter()
    state, out = step(state, batch, m)
    jax.block_until_ready(out["loss"])
    times.append(time.perf_counter() - t)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(steps_n):
        state, out = step(state, batch, m)
        jax.block_until_ready(out["loss"])
    events = trace_events(folder)
  names = op_names(run.hlo(state, batch, m))  # The same program's optimized HLO.
  per_group, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      g = group_of(names[e["name"]])
      per_group[g] += e.get("dur", 0) / 1e3 / steps_n
      calls[g] += 1
  total = sum(per_group.values())
  step_s = float(np.median(times))
  cfg = vs_torch.model_config(s)
  model = common.model_flops(cfg, text_n, m, batch_n, vs_torch.TRAIN)["total"]
  peak = common.measure_peak(shapes, earlier=peak)
  counts = vs_torch.param_counts(s)
  print(f"shape {shape}, m={m} (bucket {bucket_of(m)}), batch {batch_n}, "
        f"{counts['trainable']:,} / {counts['total']:,} parameters trainable / total: "
        f"step {step_s * 1e3:.1f} ms (median of {steps_n}), {model / 1e9:.2f} model GFLOP "
        f"({common.CONVENTION}), {model / step_s / 1e9:.1f} GFLOP/s, MFU "
        f"{model / step_s / peak['flops_per_s']:.1%}; op time {total:.1f} ms per step in "
        f"{sum(calls.values()) // steps_n} ops\n{common.peak_line(peak)}")
  print(f"{'ms/step':>9}{'share':>7}{'ops':>5}  group")
  for g, ms in per_group.most_common(_TOP.value):
    print(f"{ms:>9.2f}{ms / total:>7.1%}{calls[g] // steps_n:>5}  {g}")
  parts = collections.Counter()
  for g, ms in per_group.items():
    parts[f"{coarse_of(g)} ({g[:3]})"] += ms
  print(f"\nby part of the model:\n{'ms/step':>9}{'share':>7}  part")
  for part, ms in parts.most_common():
    print(f"{ms:>9.2f}{ms / total:>7.1%}  {part}")
  print(common.machine_lines(watch.stop()))


if __name__ == "__main__":
  app.run(main)
