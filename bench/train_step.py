r"""Train-step time and model FLOPs utilization against this machine's matmul peak.

  python -m bench.train_step            # tiny and a larger CPU config, side by side

FLOPs per step come from XLA's cost analysis of the compiled step; the peak is
a measured float32 matmul (the best a dense kernel reaches here). The ratio is
the model FLOPs utilization (MFU).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import linen as nn

from configs import tiny
from mqt import optim
from mqt.model import IGNORE, MQTLLaVA, ModelConfig, abstract_params, dummy_inputs
from mqt.train import make_train_step

_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per config.")


def matmul_peak(n=2048, repeats=10) -> float:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


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


def bench(config, batch_size: int, text_len: int, repeats: int):
  cfg = ModelConfig.from_config(config.model)
  model = MQTLLaVA(cfg)
  abstract = nn.unbox(abstract_params(cfg)["params"])
  tx, labels, _ = optim.make_optimizer(abstract, config.stage2.optim, 1000)
  step = jax.jit(make_train_step(model, tx, labels, 1), donate_argnums=(0,))
  images, ids, mask = dummy_inputs(cfg)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images, ids, mask,
                                               cfg.query.num_queries))["params"])()
  trainable, _ = optim.partition(params, labels)
  state = {"params": params, "opt_state": tx.init(trainable), "step": jnp.int32(0),
           "rng": jax.random.PRNGKey(0)}
  rng = np.random.default_rng(0)
  s = cfg.vision.image_size
  ids = rng.integers(3, cfg.llm.vocab_size, (batch_size, text_len)).astype(np.int32)
  ids[:, 1] = cfg.image_token_id
  batch = {"images": rng.normal(size=(batch_size, s, s, 3)).astype(np.float32),
           "input_ids": ids, "text_mask": np.ones((batch_size, text_len), bool),
           "labels": np.where(np.arange(text_len) > 2, ids, IGNORE).astype(np.int32)}
  ms = np.array([cfg.query.num_queries], np.int32)
  compiled = step.lower(state, batch, ms).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  state, out = compiled(state, batch, ms)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, out = compiled(state, batch, ms)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {"params": n_params, "step_s": float(np.median(times)), "flops": flops,
          "tokens": batch_size * (text_len - 1 + cfg.query.num_queries)}


def main(argv):
  del argv
  peak = matmul_peak()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  rows = [("tiny", tiny.get_config(), 32, 64), ("larger", larger(tiny.get_config()), 32, 64)]
  print(f"{'config':<8}{'params':>12}{'batch':>7}{'step ms':>10}{'GFLOP/step':>12}"
        f"{'GFLOP/s':>10}{'MFU':>8}{'tok/s':>10}")
  for name, config, b, t in rows:
    r = bench(config, b, t, _REPEATS.value)
    rate = r["flops"] / r["step_s"]
    print(f"{name:<8}{r['params']:>12,}{b:>7}{r['step_s'] * 1e3:>10.1f}{r['flops'] / 1e9:>12.2f}"
          f"{rate / 1e9:>10.1f}{rate / peak:>8.1%}{r['tokens'] / r['step_s']:>10,.0f}")


if __name__ == "__main__":
  app.run(main)
