"""The built-in default (configs/tiny.py) trains the query transformer under Matryoshka
sampling: its parameters move in the stage that samples m, m varies from step to step,
and no latent starts tied to an image cell."""
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from configs import tiny
from mqt import train
from mqt.model import MQTLLaVA, ModelConfig, dummy_inputs
from mqt import plan


def _init_attention(config, seed=0):
  """The official query transformer's attention over patches at initialisation, mean
  over heads: [M latents, P patches]."""
  cfg = ModelConfig.from_config(config.model)
  images, ids, mask = dummy_inputs(cfg)
  model = MQTLLaVA(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), images, ids, mask,
                               cfg.query.num_queries))["params"]
  x = np.random.default_rng(seed).normal(size=images.shape).astype(np.float32)
  feats = model.apply({"params": params}, x, method=lambda mdl, v: mdl.vision(v))
  _, state = model.apply({"params": params}, feats, cfg.query.num_queries, None,
                         mutable=["intermediates"],
                         method=lambda mdl, f, m, n: mdl.query(f, m, num_latents=n))
  return np.asarray(jax.tree.leaves(state["intermediates"])[0].mean(axis=1)[0])


def test_no_latent_starts_tied_to_a_cell():
  config = tiny.get_config()
  assert not config.model.query.spatial_init and config.model.query.spatial_init_gap == 0
  for seed in (0, 1):
    w = _init_attention(config, seed)
    assert w.shape == (9, 9)
    # Uniform is 1/9 = 0.11; measured at most 0.16. A latent tied to its cell
    # (spatial_init_gap=6) puts 0.98-0.99 on it.
    assert w.max() < 0.25, w.max()
  config.model.query.spatial_init, config.model.query.spatial_init_gap = True, 6.0
  assert np.diag(_init_attention(config)).min() > 0.9  # The check can fail.


def test_the_stage_that_samples_m_trains_the_query_transformer(tmp_path, capsys):
  config = tiny.get_config()
  sampling = [n for n in (1, 2) if config[f"stage{n}"].matryoshka.kind != "fixed"]
  assert sampling == [2]
  config.data.data_dir = str(tmp_path / "data")
  config.data.builtin_sizes.update(dict(captions=32, instruct=48, eval=16))
  config.stage1.steps, config.stage2.steps = 2, 6
  config.stage1.data.batch_size = config.stage2.data.batch_size = 8
  config.checkpoint.every, config.checkpoint.use_async = 1, False
  config.log_every = 1
  config.eval.ms = ()
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  logged = [int(m) for m in re.findall(r"\[stage2\] step \d+/6 .*? m (\d+) ",
                                        capsys.readouterr().out)]
  assert len(logged) == 6 and len(set(logged)) > 1, logged  # m varies across steps.
  sampler = plan.stage_sampler(config, 2, ModelConfig.from_config(config.model))
  assert len({int(sampler.sample(s)[0]) for s in range(100)}) == 9  # Every m in 1..9.

  def params(stage):
    manager = ocp.CheckpointManager(str(workdir / stage / "checkpoints"))
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return state["state"]["params"]

  before, after = params("stage1"), params("stage2")
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       before["query"], after["query"])
  assert min(jax.tree.leaves(moved)) > 0, moved  # Every query transformer leaf trained.
  frozen = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        before["vision"], after["vision"])
  assert max(jax.tree.leaves(frozen)) == 0  # The vision tower stays frozen in stage 2.
