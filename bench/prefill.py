r"""Prefill latency against m (visual tokens), next to the analytic FLOPs.

  python -m bench.prefill                 # tiny (batch 8) and a larger CPU config (1 and 8)
  python -m bench.prefill --batch_sizes=1 --ms=1,4,16 --runs=5

The timed program is `mqt.generate.prefill` with `num_latents=m`: the vision
tower, the query transformer over m latents, the splice and the LLM prompt pass
over S = T + m - 1 slots (writing a cache of S + max_new_tokens). Every m is its
own compile (a static argument); the table counts XLA compilations per m, and a
last row per batch size times the one program for every m (`num_latents=None`:
all M latents run and m is data), which costs as much as m = M whatever m is.

Latency: the median of --runs warmed calls, taken in rounds over all m (each
round times every program once, so a busy machine slows every m alike).
FLOPs: `mqt.flops` (matmuls only; XLA's cost analysis counts 3-4% more on
these sizes, its elementwise work). The speed-up columns set
latency(M)/latency(m) beside FLOPs(M)/FLOPs(m): the fixed costs (the vision
tower, the text tokens) bound both, and small programs run below the
machine's matmul rate, so latency shrinks less than FLOPs as m falls.
"""
import functools
import time

import jax
import numpy as np
from absl import app
from absl import flags
from flax import linen as nn

from bench.train_step import matmul_peak
from configs import tiny
from mqt import cli
from mqt import flops
from mqt import generate as gen
from mqt.jax_utils import count_compiles
from mqt.matryoshka import validate_m
from mqt.model import MQTLLaVA, ModelConfig, dummy_inputs

_RUNS = flags.DEFINE_integer("runs", 9, "Timed calls per (config, batch size, m); median.")
_BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", [], "Batch sizes to time (default: 8 for tiny, whose batch 1 times\n"
    "dispatch overhead, and 1 and 8 for the larger config).")
_MS = flags.DEFINE_list("ms", ["1", "2", "4", "8", "16"], "Values of m; M is always added.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 32, "Prompt tokens T, <image> placeholder included.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Decode budget (sets the cache length).")
_VARIANT = flags.DEFINE_enum("variant", "official", ["official", "perceiver"],
                             "Query transformer variant for both configs.")


def larger(config):
  """A CPU config at 224 px: P = 196 patches, M = 64, a 512-wide 4-layer LLM."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.vision.update(dict(image_size=224, patch_size=16, width=256, depth=4, heads=4,
                               mlp_dim=1024))
    c.model.query.update(dict(num_queries=64, heads=4, mlp_dim=1024,
                              spatial_init_gap=0.0))  # M != P: the random shared init.
    c.model.llm.update(dict(width=512, depth=4, heads=8, kv_heads=8, head_dim=64, mlp_dim=1376,
                            vocab_size=4096))
  return c


_PREFILL = jax.jit(gen.prefill, static_argnames=("model", "max_new_tokens", "num_latents"))


def bench(config, batch: int, ms, text_len: int, max_new: int, runs: int) -> list[dict]:
  """One row per m (and one for num_latents=None): latency, compiles, analytic FLOPs.

  Every program is compiled and warmed first; then `runs` rounds time each program once
  in turn, so that load from elsewhere on the machine falls on every m alike.
  """
  cfg = ModelConfig.from_config(config.model)
  big_m = cfg.query.num_queries
  ms = sorted({validate_m(m, big_m) for m in ms if m <= big_m} | {big_m})
  model = MQTLLaVA(cfg)
  images, ids, mask = dummy_inputs(cfg)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images, ids, mask,
                                               big_m))["params"])()
  rng = np.random.default_rng(0)
  s = cfg.vision.image_size
  images = rng.normal(size=(batch, s, s, cfg.vision.channels)).astype(np.float32)
  ids = rng.integers(3, cfg.llm.vocab_size, (batch, text_len)).astype(np.int32)
  ids[:, 1] = cfg.image_token_id
  mask = np.ones((batch, text_len), bool)
  images, ids, mask = jax.device_put((images, ids, mask))
  rows = []
  for m, num_latents in [(m, m) for m in ms] + [(1, None)]:
    f = flops.flops_per_m(cfg, text_len, num_latents or big_m, max_new, batch=batch)
    call = functools.partial(_PREFILL, model, params, images, ids, mask, m,
                             max_new_tokens=max_new, num_latents=num_latents)
    with count_compiles() as compiles:
      t = time.perf_counter()
      jax.block_until_ready(call())
      first = time.perf_counter() - t
      rows.append(dict(m=m, sliced=num_latents is not None, seq_len=f["seq_len"],
                       flops=f["prefill"], call=call, first_s=first, times=[]))
    rows[-1]["compiles"] = compiles()
  with count_compiles() as recompiles:
    for _ in range(runs):
      for r in rows:
        t = time.perf_counter()
        jax.block_until_ready(r["call"]())
        r["times"].append(time.perf_counter() - t)
  for r in rows:
    r["latency_s"] = float(np.median(r.pop("times")))
    r["recompiles"] = recompiles()
    del r["call"]
  return rows


def main(argv):
  cli.start(argv)
  ms = [int(x) for x in _MS.value]
  start = time.perf_counter()
  peak = matmul_peak()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, measured f32 matmul "
        f"peak {peak / 1e9:.1f} GFLOP/s; prefill of T={_TEXT_LEN.value} text tokens + m visual "
        f"tokens, cache S + {_MAX_NEW.value}, query variant {_VARIANT.value}, median of "
        f"{_RUNS.value} runs")
  recompiles = 0
  base = tiny.get_config(f"variant={_VARIANT.value}")
  chosen = [int(b) for b in _BATCH_SIZES.value]
  for name, config, batches in (("tiny", base, chosen or [8]),
                                ("larger", larger(base), chosen or [1, 8])):
    c = ModelConfig.from_config(config.model)
    print(f"\n{name}: {c.vision.image_size}px/{c.vision.patch_size} vision (P="
          f"{flops.num_patches(c.vision)}, width {c.vision.width}, {c.vision.layers_used} "
          f"blocks), M={c.query.num_queries}, LLM {c.llm.width} x {c.llm.depth}")
    print(f"{'batch':>5}{'m':>6}{'S':>5}{'compiles':>10}{'1st call s':>11}{'latency ms':>12}"
          f"{'GFLOPs':>9}{'GFLOP/s':>9}{'lat(M)/lat(m)':>15}{'FLOPs(M)/FLOPs(m)':>19}")
    for batch in batches:
      rows = bench(config, batch, ms, _TEXT_LEN.value, _MAX_NEW.value, _RUNS.value)
      recompiles += rows[0]["recompiles"]
      full = next(r for r in rows if r["sliced"] and r["m"] == c.query.num_queries)
      for r in rows:
        label = str(r["m"]) if r["sliced"] else "any*"
        print(f"{batch:>5}{label:>6}{r['seq_len']:>5}{r['compiles']:>10}{r['first_s']:>11.2f}"
              f"{r['latency_s'] * 1e3:>12.2f}{r['flops'] / 1e9:>9.3f}"
              f"{r['flops'] / r['latency_s'] / 1e9:>9.1f}"
              f"{full['latency_s'] / r['latency_s']:>15.2f}{full['flops'] / r['flops']:>19.2f}")
  print("\ncompiles: XLA compilations in the first call of that program (one per m); "
        f"compilations during all timed calls: {recompiles}.\n"
        "any*: num_latents=None, one program for every m (all M latents run, m is data; "
        "timed at m=1).")
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
