r"""Prefill time per serving bucket against the bucket's FLOPs: does time follow FLOPs?

  python -m bench.bucket_prefill --json_out=/tmp/bucket_prefill.json
  python -m bench.bucket_prefill --configs=tiny --runs=2        # a quick look

The serving engine (mqt/serving.py) runs a batch in the smallest bucket b that holds its
largest m: `generate.prefill(..., num_latents=b)`, the query transformer over b latents
and the LLM over T + b - 1 slots, each row's m as data (int32 [batch]). Here, for every
bucket of `matryoshka.pow2_buckets(M)`, that prefill is compiled once and timed on a
batch whose rows mix m over the bucket's range (previous bucket + 1 .. b, b included);
the XLA compilations of each program are counted (one per bucket, none while timed).

Configs: `tiny` (configs/tiny.py, M = 9: buckets 1, 2, 4, 8, 9) and `larger` (the tiny
config at 224 px, P = 196 patches, M = 64, a 512-wide 4-layer LLM: the larger CPU config
of bench/prefill.py; buckets 1 .. 64), random weights, float32.

Columns: GFLOPs of the bucket's program (`mqt.flops.flops_per_m` at m = b, the batch's
"prefill": tower, query transformer, LLM prompt pass), the median time of --runs warmed
calls (taken in rounds over all buckets of a config, so load from elsewhere falls on
every bucket alike), GFLOP/s and MFU against the best float32 matmul measured before and
after (bench/common.py), each bucket's time and FLOPs over the largest bucket's, and
|time ratio / FLOP ratio - 1|: PASS when within --tolerance (time shrinks with the bucket
as its FLOPs do). The last lines say whether the machine was busy.
"""
import functools
import time

import jax
import numpy as np
from absl import flags

from bench import common
from configs import tiny
from mqt import cli
from mqt import flops
from mqt import generate as gen
from mqt import matryoshka
from mqt.model import ModelConfig

CONFIGS = ("tiny", "larger")
_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS), f"Which configs to time: {CONFIGS}.")
_RUNS = flags.DEFINE_integer("runs", 7, "Timed calls per bucket; the median is reported.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 32, "Prompt tokens T, <image> placeholder included.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Decode budget (sets the cache length).")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.15, "PASS: |time ratio / FLOP ratio - 1| <= this.")
_JSON = common.define_json_flag()


def larger(config):
  """The larger CPU config of bench/prefill.py: 224 px, P = 196 patches, M = 64, a 512-wide
  4-layer LLM."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.vision.update(dict(image_size=224, patch_size=16, width=256, depth=4, heads=4,
                               mlp_dim=1024))
    c.model.query.update(dict(num_queries=64, heads=4, mlp_dim=1024, spatial_init_gap=0.0))
    c.model.llm.update(dict(width=512, depth=4, heads=8, kv_heads=8, head_dim=64, mlp_dim=1376,
                            vocab_size=4096))
  return c


def row_ms(buckets, bucket: int, batch: int) -> list[int]:
  """m per row inside `bucket`: cycling over previous bucket + 1 .. bucket, from the top
  (so the bucket's own size is always there)."""
  low = max([b for b in buckets if b < bucket], default=0) + 1
  span = list(range(bucket, low - 1, -1))
  return [span[i % len(span)] for i in range(batch)]


_PREFILL = jax.jit(gen.prefill, static_argnames=("model", "max_new_tokens", "num_latents"))


def bench(config, batch: int, text_len: int, max_new: int, runs: int) -> list[dict]:
  """One row per bucket: the rows' m, compiles, first call, median time, FLOPs."""
  cfg = ModelConfig.from_config(config.model)
  big_m = cfg.query.num_queries
  buckets = matryoshka.pow2_buckets(big_m)
  model, params, images, ids, mask = common.random_prefill_setup(cfg, batch, text_len)
  rows, calls = [], {}
  for b in buckets:
    ms = row_ms(buckets, b, batch)
    call = functools.partial(_PREFILL, model, params, images, ids, mask,
                             jax.device_put(np.asarray(ms, np.int32)), max_new_tokens=max_new,
                             num_latents=b)
    calls[b] = lambda call=call: jax.block_until_ready(call())
    with common.count_compiles() as compiles:
      t = time.perf_counter()
      calls[b]()
      first = time.perf_counter() - t
    f = flops.flops_per_m(cfg, text_len, b, max_new, batch)
    rows.append(dict(bucket=b, ms=ms, seq_len=f["seq_len"], flops=f["prefill"],
                     compiles=compiles(), first_s=first))
  with common.count_compiles() as recompiles:
    times = common.time_rounds(calls, runs)
  for r in rows:
    r["times_s"] = times[r["bucket"]]
    r["latency_s"] = float(np.median(times[r["bucket"]]))
    r["timed_compiles"] = recompiles()
  return rows


def compare(rows: list[dict], tolerance: float) -> None:
  """Adds the ratios to the largest bucket and the verdict to each row."""
  top = max(rows, key=lambda r: r["bucket"])
  for r in rows:
    r["time_ratio"] = r["latency_s"] / top["latency_s"]
    r["flop_ratio"] = r["flops"] / top["flops"]
    r["deviation"] = abs(r["time_ratio"] / r["flop_ratio"] - 1)
    r["pass"] = r["deviation"] <= tolerance


def print_rows(rows: list[dict], peak: float) -> None:
  print(f"{'bucket':>6}{'rows m':>12}{'S':>5}{'compiles':>9}{'GFLOPs':>9}{'time ms':>10}"
        f"{'GFLOP/s':>9}{'MFU':>7}{'time/top':>10}{'FLOPs/top':>10}{'|t/f - 1|':>10}{'':>6}")
  for r in rows:
    rate = r["flops"] / r["latency_s"]
    ms = f"{min(r['ms'])}..{max(r['ms'])}"
    print(f"{r['bucket']:>6}{ms:>12}{r['seq_len']:>5}{r['compiles']:>9}"
          f"{r['flops'] / 1e9:>9.3f}{r['latency_s'] * 1e3:>10.2f}{rate / 1e9:>9.1f}"
          f"{rate / peak:>7.1%}{r['time_ratio']:>10.3f}{r['flop_ratio']:>10.3f}"
          f"{r['deviation']:>10.1%}{'PASS' if r['pass'] else 'FAIL':>6}")


def main(argv):
  cli.start(argv)
  unknown = [c for c in _CONFIGS.value if c not in CONFIGS]
  if unknown or not _CONFIGS.value:
    raise cli.UserError(f"--configs={','.join(_CONFIGS.value)}: choose from {CONFIGS}")
  for name, flag in (("runs", _RUNS), ("batch_size", _BATCH), ("text_len", _TEXT_LEN),
                     ("max_new_tokens", _MAX_NEW)):
    if flag.value < 1:
      raise cli.UserError(f"--{name}={flag.value} must be >= 1")
  if not _TOLERANCE.value > 0:
    raise cli.UserError(f"--tolerance={_TOLERANCE.value} must be > 0")
  watch = common.MachineWatch().start()
  base = tiny.get_config()
  configs = [(name, base if name == "tiny" else larger(base)) for name in _CONFIGS.value]
  batch, text_len = _BATCH.value, _TEXT_LEN.value
  shapes = set()
  for _, config in configs:
    c = ModelConfig.from_config(config.model)
    shapes |= set(common.model_shapes(c, batch * (text_len + c.query.num_queries - 1)))
  peak = common.measure_peak(sorted(shapes))
  timed = []
  for name, config in configs:
    rows = bench(config, batch, text_len, _MAX_NEW.value, _RUNS.value)
    compare(rows, _TOLERANCE.value)
    timed.append((name, ModelConfig.from_config(config.model), rows))
    print(f"{name}: timed", flush=True)
  peak = common.measure_peak(sorted(shapes), earlier=peak)
  record = watch.stop()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{common.peak_line(peak)}\nprefill per serving bucket b (num_latents=b, rows' m "
        f"mixed inside the bucket), batch {batch}, T={text_len} text tokens, cache S + "
        f"{_MAX_NEW.value}; median of {_RUNS.value} runs; FLOPs: mqt.flops.flops_per_m "
        f"prefill at m = b; PASS: |time ratio / FLOP ratio - 1| <= {_TOLERANCE.value:.0%}")
  results = []
  for name, c, rows in timed:
    print(f"\n{name}: {c.vision.image_size}px/{c.vision.patch_size} vision (P="
          f"{flops.num_patches(c.vision)}, width {c.vision.width}), M={c.query.num_queries}, "
          f"LLM {c.llm.width} x {c.llm.depth}")
    print_rows(rows, peak["flops_per_s"])
    passed = sum(r["pass"] for r in rows)
    print(f"{passed} of {len(rows)} buckets PASS; XLA compilations while timed: "
          f"{rows[0]['timed_compiles']}")
    results += [dict(r, config=name, batch=batch) for r in rows]
  common.finish(record, _JSON(), rows=results, peak=peak, tolerance=_TOLERANCE.value,
                text_len=text_len, max_new_tokens=_MAX_NEW.value, batch=batch)


if __name__ == "__main__":
  cli.run(main)
