r"""Train-step time and model FLOPs utilization (MFU) against this machine's matmul peak.

  python -m bench.train_step                  # tiny and a larger CPU config, side by side
  python -m bench.train_step --repeats=5 --json_out=/tmp/train_step.json

The jitted stage-2 step of each config (its optimizer rules: the tower frozen, the
query transformer and the LLM training), batch 32 of 64 text tokens. Three rows per
config, timed in rounds (each round runs every program once, so load from elsewhere
falls on all alike):
  m = M       the step as training runs it without buckets: all M latents, T + M - 1
              LLM slots;
  m = 1 pad   the same program at m = 1 (m is data; the slots past m are padding);
  m = 1 own   a program compiled for m = 1 (`num_latents=1`: T slots), what a bucket
              of one costs.
Parameters: trainable (what the optimizer updates) / total.
FLOPs: `bench.common.model_flops` (MaxText model FLOPs; see bench/common.py): "model"
at the row's m and exact length T + m - 1, "run" at the length the program runs
(padded: T + M - 1 with all M latents). MFU = model GFLOP / step time / the peak,
the best float32 matmul measured before and after the timed steps
(`bench.common.measure_peak`, named in the output); the last lines say whether the
machine was busy (`bench.common.MachineWatch`). XLA GFLOP: the compiled step's cost
analysis (elementwise work, the loss's recomputed chunks and padding included), for
reference.
"""
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import linen as nn

from bench import common
from configs import tiny
from mqt import optim
from mqt.model import IGNORE, MQTLLaVA, ModelConfig, abstract_params, dummy_inputs
from mqt.params import state_initializer
from mqt.train_step import make_train_step

_REPEATS = flags.DEFINE_integer("repeats", 6, "Timed steps per program (rounds).")
_JSON = common.define_json_flag()
BATCH, TEXT_LEN = 32, 64


def larger(config):
  """A CPU config ~10x tiny's compute: wider vision, LLM and more latents."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.vision.update(dict(image_size=96, patch_size=8, width=128, depth=4, heads=4,
                               mlp_dim=256))
    c.model.query.update(dict(num_queries=36, heads=4,
                              spatial_init_gap=0.0))  # M != P: the random shared init.
    c.model.llm.update(dict(width=256, depth=4, heads=8, kv_heads=4, head_dim=32, mlp_dim=512,
                            vocab_size=2048))
  return c


def setup(config, batch_size: int, text_len: int):
  """The stage-2 model, optimizer, a fresh train state and one random batch."""
  cfg = ModelConfig.from_config(config.model)
  model = MQTLLaVA(cfg)
  abstract = nn.unbox(abstract_params(cfg)["params"])
  tx, labels, _ = optim.make_optimizer(abstract, config.stage2.optim, 1000)
  images, ids, mask = dummy_inputs(cfg)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images, ids, mask,
                                               cfg.query.num_queries))["params"])()
  state = state_initializer(tx, labels)(params)
  rng = np.random.default_rng(0)
  s = cfg.vision.image_size
  ids = rng.integers(3, cfg.llm.vocab_size, (batch_size, text_len)).astype(np.int32)
  ids[:, 1] = cfg.image_token_id
  batch = {"images": rng.normal(size=(batch_size, s, s, 3)).astype(np.float32),
           "input_ids": ids, "text_mask": np.ones((batch_size, text_len), bool),
           "labels": np.where(np.arange(text_len) > 2, ids, IGNORE).astype(np.int32)}
  return types.SimpleNamespace(
      cfg=cfg, model=model, tx=tx, labels=labels, state=state, batch=jax.device_put(batch),
      batch_size=batch_size, text_len=text_len, counts=common.param_counts(params, labels),
      train=common.trainable_parts(labels, cfg.train_vision))


def bench(run, cases, repeats: int) -> list[dict]:
  """cases: (label, m, num_latents); one row per case with its median step time."""
  rows = []
  for label, m, num_latents in cases:
    ms = jnp.asarray([m], jnp.int32)
    step = jax.jit(make_train_step(run.model, run.tx, run.labels, 1, num_latents=num_latents),
                   donate_argnums=(0,))
    compiled = step.lower(run.state, run.batch, ms).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    run.state, out = compiled(run.state, run.batch, ms)  # Warm-up.
    jax.block_until_ready(out)
    exact = common.model_flops(run.cfg, run.text_len, m, run.batch_size, run.train)
    ran = common.model_flops(run.cfg, run.text_len, num_latents or run.cfg.query.num_queries,
                             run.batch_size, run.train)
    rows.append(dict(label=label, m=m, slots=ran["seq_len"], model_flops=exact["total"],
                     run_flops=ran["total"], xla_flops=float(cost.get("flops", 0.0)),
                     tokens=run.batch_size * exact["seq_len"], call=compiled, ms=ms, times=[]))
  for _ in range(repeats):
    for r in rows:
      t = time.perf_counter()
      run.state, out = r["call"](run.state, run.batch, r["ms"])
      jax.block_until_ready(out)
      r["times"].append(time.perf_counter() - t)
  for r in rows:
    r["step_s"] = float(np.median(r.pop("times")))
    del r["call"], r["ms"]
  return rows


def cases_for(cfg: ModelConfig):
  big_m = cfg.query.num_queries
  return [(f"{big_m}", big_m, None), ("1 pad", 1, None), ("1 own", 1, 1)]


def main(argv):
  del argv
  watch = common.MachineWatch().start()
  configs = [("tiny", tiny.get_config()), ("larger", larger(tiny.get_config()))]
  runs = {name: setup(config, BATCH, TEXT_LEN) for name, config in configs}
  shapes = sorted({s for r in runs.values() for s in common.model_shapes(
      r.cfg, BATCH * (TEXT_LEN + r.cfg.query.num_queries - 1))})
  peak = common.measure_peak(shapes)
  results = []
  for name, run in runs.items():
    for r in bench(run, cases_for(run.cfg), _REPEATS.value):
      results.append(dict(r, config=name, params=run.counts, train=run.train))
    print(f"{name}: timed", flush=True)
  peak = common.measure_peak(shapes, earlier=peak)
  record = watch.stop()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{common.peak_line(peak)}\nFLOPs: {common.CONVENTION} (bench/common.py), batch "
        f"{BATCH}, T = {TEXT_LEN} text tokens, median of {_REPEATS.value} steps per row")
  print(f"{'config':<8}{'trainable/total params':>24}{'m':>7}{'slots':>6}{'step ms':>9}"
        f"{'model GFLOP':>12}{'run GFLOP':>10}{'XLA GFLOP':>10}{'GFLOP/s':>9}{'MFU':>7}"
        f"{'tok/s':>8}")
  for r in results:
    rate = r["model_flops"] / r["step_s"]
    r["mfu"] = rate / peak["flops_per_s"]
    counts = f"{r['params']['trainable']:,}/{r['params']['total']:,}"
    print(f"{r['config']:<8}{counts:>24}{r['label']:>7}{r['slots']:>6}{r['step_s'] * 1e3:>9.1f}"
          f"{r['model_flops'] / 1e9:>12.2f}{r['run_flops'] / 1e9:>10.2f}"
          f"{r['xla_flops'] / 1e9:>10.2f}{rate / 1e9:>9.1f}{r['mfu']:>7.1%}"
          f"{r['tokens'] / r['step_s']:>8,.0f}")
  print("parts training: " + ", ".join(f"{n}: {'+'.join(r.train)}" for n, r in runs.items())
        + "; slots: LLM sequence length the program runs; tok/s: T + m - 1 per row")
  common.finish(record, _JSON(), rows=results, peak=peak)


if __name__ == "__main__":
  app.run(main)
