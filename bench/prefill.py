r"""Prefill latency against m (visual tokens), and what padding every sequence to M costs.

  python -m bench.prefill                 # tiny (batch 8) and a larger CPU config (1 and 8)
  python -m bench.prefill --batch_sizes=1 --ms=1,4,16 --runs=5 --json_out=/tmp/prefill.json

The timed program is `mqt.generate.prefill` in two forms:
  exact   `num_latents=m`: the vision tower, the query transformer over m latents, the
          splice and the LLM prompt pass over S = T + m - 1 slots (writing a cache of
          S + max_new_tokens). Every m is its own compile (a static argument); the
          table counts XLA compilations per program.
  padded  `num_latents=None`: one program for every m (all M latents run, m is data,
          T + M - 1 slots), as training and teacher-forced evaluation pad every
          sequence; timed at each m too.
Latency: the median of --runs warmed calls, taken in rounds over all programs (each
round times every program once, so a busy machine slows every m alike).
FLOPs: `bench.common.model_flops`, MaxText model FLOPs of a forward pass (matmuls,
multiply-add = 2, causal LLM attention halved, the LM head at the last position; see
bench/common.py) at the exact length, and at the padded length for the padded rows.
MFU divides by the best float32 matmul measured before and after the timed calls
(named in the output); the last lines say whether the machine was busy.
The speed-up columns set latency(M)/latency(m) beside FLOPs(M)/FLOPs(m): the fixed
costs (the vision tower, the text tokens) bound both, and small programs run below
the machine's matmul rate, so latency shrinks less than FLOPs as m falls. The
padding table adds the training step's FLOPs at both lengths (the config's stage-2
parts training).
"""
import functools
import time

import jax
import numpy as np
from absl import app
from absl import flags
from flax import linen as nn

from bench import common
from configs import tiny
from mqt import cli
from mqt import flops
from mqt import generate as gen
from mqt import optim
from bench.common import count_compiles
from mqt.matryoshka import validate_m
from mqt.model import ModelConfig, abstract_params

_RUNS = flags.DEFINE_integer("runs", 7, "Timed calls per (config, batch size, program); median.")
_BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", [], "Batch sizes to time (default: 8 for tiny, whose batch 1 times\n"
    "dispatch overhead, and 1 and 8 for the larger config).")
_MS = flags.DEFINE_list("ms", ["1", "2", "4", "8", "16"], "Values of m; M is always added.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 32, "Prompt tokens T, <image> placeholder included.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Decode budget (sets the cache length).")
_VARIANT = flags.DEFINE_enum("variant", "official", ["official", "perceiver"],
                             "Query transformer variant for both configs.")
_JSON = common.define_json_flag()


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
  """One row per (m, program): latency, compiles, model FLOPs at the length it runs.

  Every program is compiled and warmed first; then `runs` rounds time each call once
  in turn, so that load from elsewhere on the machine falls on every m alike.
  """
  cfg = ModelConfig.from_config(config.model)
  big_m = cfg.query.num_queries
  ms = sorted({validate_m(m, big_m) for m in ms if m <= big_m} | {big_m})
  model, params, images, ids, mask = common.random_prefill_setup(cfg, batch, text_len)
  rows = []
  for m, num_latents in [(m, m) for m in ms] + [(m, None) for m in ms]:
    f = common.model_flops(cfg, text_len, m, batch, padded=num_latents is None)
    call = functools.partial(_PREFILL, model, params, images, ids, mask, m,
                             max_new_tokens=max_new, num_latents=num_latents)
    with count_compiles() as compiles:
      t = time.perf_counter()
      jax.block_until_ready(call())
      first = time.perf_counter() - t
      rows.append(dict(m=m, sliced=num_latents is not None, seq_len=f["seq_len"],
                       flops=f["total"], call=call, first_s=first, times=[]))
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


def training_parts(config) -> tuple[str, ...]:
  """The parts the config's stage 2 trains (its optimizer rules)."""
  cfg = ModelConfig.from_config(config.model)
  labels = optim.param_labels(nn.unbox(abstract_params(cfg)["params"]), config.stage2.optim.rules)
  return common.trainable_parts(labels, cfg.train_vision)


def print_rows(rows, batch: int, peak: float) -> None:
  full = next(r for r in rows if r["sliced"] and r["m"] == max(x["m"] for x in rows))
  for r in (r for r in rows if r["sliced"]):
    rate = r["flops"] / r["latency_s"]
    print(f"{batch:>5}{r['m']:>6}{r['seq_len']:>5}{r['compiles']:>10}{r['first_s']:>11.2f}"
          f"{r['latency_s'] * 1e3:>12.2f}{r['flops'] / 1e9:>9.3f}{rate / 1e9:>9.1f}"
          f"{rate / peak:>7.1%}{full['latency_s'] / r['latency_s']:>15.2f}"
          f"{full['flops'] / r['flops']:>19.2f}")


def print_padding(cfg, rows, batch: int, text_len: int, train) -> list[dict]:
  """Exact against padded rows per m: FLOPs (prefill and training step) and time."""
  out = []
  padded = {r["m"]: r for r in rows if not r["sliced"]}
  for r in (r for r in rows if r["sliced"]):
    p = padded[r["m"]]
    step = lambda pad, m=r["m"]: common.model_flops(cfg, text_len, m, batch, train, pad)["total"]
    out.append(dict(batch=batch, m=r["m"], exact_s=r["latency_s"], padded_s=p["latency_s"],
                    exact_flops=r["flops"], padded_flops=p["flops"],
                    train_exact_flops=step(False), train_padded_flops=step(True)))
    x = out[-1]
    print(f"{batch:>5}{r['m']:>6}{r['seq_len']:>5}{p['seq_len']:>7}{r['flops'] / 1e9:>9.3f}"
          f"{p['flops'] / 1e9:>9.3f}{p['flops'] / r['flops']:>9.2f}"
          f"{x['train_padded_flops'] / x['train_exact_flops']:>10.2f}"
          f"{r['latency_s'] * 1e3:>10.2f}{p['latency_s'] * 1e3:>10.2f}"
          f"{p['latency_s'] / r['latency_s']:>9.2f}{p['compiles']:>9}")
  return out


def main(argv):
  cli.start(argv)
  watch = common.MachineWatch().start()
  ms = [int(x) for x in _MS.value]
  text_len = _TEXT_LEN.value
  base = tiny.get_config(f"variant={_VARIANT.value}")
  chosen = [int(b) for b in _BATCH_SIZES.value]
  configs = (("tiny", base, chosen or [8]), ("larger", larger(base), chosen or [1, 8]))
  shapes = set()
  for _, config, batches in configs:
    c = ModelConfig.from_config(config.model)
    shapes |= set(common.model_shapes(c, max(batches) * (text_len + c.query.num_queries - 1)))
  peak = common.measure_peak(sorted(shapes))
  timed = []
  for name, config, batches in configs:
    per_batch = [(b, bench(config, b, ms, text_len, _MAX_NEW.value, _RUNS.value))
                 for b in batches]
    timed.append((name, ModelConfig.from_config(config.model), training_parts(config), per_batch))
    print(f"{name}: timed", flush=True)
  peak = common.measure_peak(sorted(shapes), earlier=peak)
  record = watch.stop()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{common.peak_line(peak)}\nprefill of T={text_len} text tokens + m visual tokens, "
        f"cache S + {_MAX_NEW.value}, query variant {_VARIANT.value}, median of {_RUNS.value} "
        f"runs; FLOPs: {common.CONVENTION} (bench/common.py), forward")
  recompiles, results, padding = 0, [], []
  for name, c, train, per_batch in timed:
    print(f"\n{name}: {c.vision.image_size}px/{c.vision.patch_size} vision (P="
          f"{flops.num_patches(c.vision)}, width {c.vision.width}, {c.vision.layers_used} "
          f"blocks), M={c.query.num_queries}, LLM {c.llm.width} x {c.llm.depth}")
    print(f"{'batch':>5}{'m':>6}{'S':>5}{'compiles':>10}{'1st call s':>11}{'latency ms':>12}"
          f"{'GFLOPs':>9}{'GFLOP/s':>9}{'MFU':>7}{'lat(M)/lat(m)':>15}{'FLOPs(M)/FLOPs(m)':>19}")
    for batch, rows in per_batch:
      recompiles += rows[0]["recompiles"]
      print_rows(rows, batch, peak["flops_per_s"])
      results += [dict(r, config=name, batch=batch) for r in rows]
    print(f"padded (T + M - 1 slots, all M latents, one program) against exact (T + m - 1): "
          f"prefill FLOPs, training-step FLOPs ({'+'.join(train)} training) and prefill time")
    print(f"{'batch':>5}{'m':>6}{'S':>5}{'S pad':>7}{'GFLOPs':>9}{'pad':>9}{'pad/ex':>9}"
          f"{'train p/e':>10}{'exact ms':>10}{'pad ms':>10}{'pad/ex':>9}{'compiles':>9}")
    for batch, rows in per_batch:
      padding += [dict(x, config=name) for x in print_padding(c, rows, batch, text_len, train)]
  print("\ncompiles: XLA compilations in the first call of that program (exact: one per m; "
        f"padded: one for every m); compilations during all timed calls: {recompiles}.")
  common.finish(record, _JSON(), rows=results, padding=padding, peak=peak)


if __name__ == "__main__":
  app.run(main)
