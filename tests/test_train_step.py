"""The train step: one compile for every m, sharded == unsharded, frozen stays frozen."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from mqt import config_lib, matryoshka, optim
from mqt import sharding as shard_lib
from bench.common import count_compiles
from mqt.model import IGNORE, MQTLLaVA, ModelConfig, abstract_params
from mqt.train_step import make_train_step
from mqt import params as params_lib
from mqt import plan


def _setup(rules, lr=1e-3, accum=1, eps=1e-8):
  config = tiny.get_config()
  cfg = ModelConfig.from_config(config.model)
  model = MQTLLaVA(cfg)
  optim_cfg = config.stage2.optim.copy_and_resolve_references()
  with optim_cfg.unlocked():
    optim_cfg.rules = rules
    optim_cfg.lr = lr
    optim_cfg.warmup = 0
    optim_cfg.eps = eps
  abstract = nn.unbox(abstract_params(cfg)["params"])
  tx, labels, _ = optim.make_optimizer(abstract, optim_cfg, total_steps=100)
  return config, cfg, model, tx, labels, make_train_step(model, tx, labels, accum)


def _batch(cfg, b=8, t=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.llm.vocab_size, size=(b, t)).astype(np.int32)
  ids[:, 1] = cfg.image_token_id
  ids[b - 1, 1] = 5  # One text-only row.
  lengths = rng.integers(6, t + 1, size=b)
  mask = np.arange(t)[None] < lengths[:, None]
  labels = np.where(mask & (np.arange(t)[None] >= 3), ids, IGNORE).astype(np.int32)
  s = cfg.vision.image_size
  images = rng.normal(size=(b, s, s, 3)).astype(np.float32)
  return {"images": images, "input_ids": ids, "text_mask": mask, "labels": labels}


def _state(model, cfg, tx, labels, shardings=None):
  from mqt.model import dummy_inputs
  images, ids, mask = dummy_inputs(cfg)
  init = lambda: nn.unbox(model.init(jax.random.key(0), images, ids, mask, 16))["params"]
  params = jax.jit(init, out_shardings=shardings)() if shardings else jax.jit(init)()
  return params_lib.state_initializer(tx, labels)(params)


def test_fifty_official_steps_compile_once():
  _, cfg, model, tx, labels, step = _setup(config_lib.STAGE2_RULES)
  state = _state(model, cfg, tx, labels)
  sampler = matryoshka.MSampler("official", cfg.query.num_queries, seed=0)
  batch = _batch(cfg)
  jitted = jax.jit(step, donate_argnums=(0,))
  seen = set()
  with count_compiles() as compiles:
    for i in range(50):
      ms = sampler.sample(i)
      seen.add(int(ms[0]))
      state, out = jitted(state, batch, ms)
  assert compiles() == 1
  assert seen == set(range(2, cfg.query.num_queries + 1, 2))  # Every even m of 2..M.
  assert np.isfinite(float(out["loss"]))


@pytest.mark.parametrize("accum", [1, 2])
def test_sharded_equals_unsharded(accum):
  # Adam turns a gradient component that is ~0 (1e-9, rounding noise whose sign
  # depends on the reduction order) into a full +-lr step; eps=1e-3 keeps such
  # components from moving while real gradients (~1e-2) still take ~lr steps.
  # The sharded run is set up as train.py's: the optimizer state sharded like its
  # parameters (abstract_train_state), activations constrained under the rules.
  rules = config_lib.STAGE2_RULES  # The query transformer and the LLM train.
  config, cfg, model, tx, labels, step = _setup(rules, eps=1e-3, accum=accum)
  batch = _batch(cfg, b=8)
  results = []
  for spec, devices in ((dict(data=2, fsdp=2, tensor=2), jax.devices()[:8]),
                        (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
    mesh = shard_lib.make_mesh(spec, devices)
    rules_table = tuple(config.sharding.logical_axis_rules)
    shardings = params_lib.param_shardings(cfg, mesh, rules_table)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_table):
      params = _state(model, cfg, tx, labels, shardings)["params"]
      make_state = params_lib.state_initializer(tx, labels)
      abstract = params_lib.abstract_train_state(
          make_state, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype,
                                                                  sharding=p.sharding), params),
          labels, mesh)
      state = jax.jit(make_state, out_shardings=params_lib.shardings_of(abstract))(params)
      jitted = jax.jit(step, out_shardings=(params_lib.shardings_of(abstract), None))
      losses = []
      for i in range(5):
        state, out = jitted(state, shard_lib.put_batch(batch, mesh), np.array([4 + 2 * i], np.int32))
        losses.append(float(out["loss"]))
    if spec["tensor"] == 2:
      q = state["params"]["llm"]["layers_0"]["q_proj"]["kernel"]
      assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape != q.shape
      moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
                 if "llm/layers_0/q_proj/kernel" in jax.tree_util.keystr(path)]
      assert len(moments) == 2  # Adam's mu and nu, sharded as the kernel.
      assert all(x.sharding.is_equivalent_to(q.sharding, q.ndim) for x in moments)
      assert all(x.addressable_shards[0].data.shape == q.addressable_shards[0].data.shape
                 for x in moments)
    results.append((losses, jax.device_get(state["params"])))
  (l8, p8), (l1, p1) = results
  np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=0)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p8, p1))
  assert max(diffs) <= 1e-4, max(diffs)
  # ... while the parameters did train:
  start = _state(model, cfg, tx, labels)["params"]["query"]
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                          jax.device_get(start), p1["query"]))) > 1e-3


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_parameters_stay_bitwise_identical(stage):
  from mqt import config_lib
  rules = config_lib.STAGE1_RULES if stage == 1 else config_lib.STAGE2_RULES
  _, cfg, model, tx, labels, step = _setup(rules)
  state = _state(model, cfg, tx, labels)
  before = jax.device_get(state["params"])
  jitted = jax.jit(step)
  for i in range(3):
    state, _ = jitted(state, _batch(cfg, seed=i), np.array([16], np.int32))
  after = jax.device_get(state["params"])
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))
  assert same(before["vision"], after["vision"])
  assert not same(before["query"], after["query"])
  assert same(before["llm"], after["llm"]) == (stage == 1)


def test_gradient_accumulation_equals_one_big_batch():
  rules = config_lib.STAGE2_RULES  # The query transformer and the LLM train.
  outs = []
  for accum in (1, 4):  # eps=1e-3: see test_sharded_equals_unsharded.
    _, cfg, model, tx, labels, step = _setup(rules, accum=accum, eps=1e-3)
    state = _state(model, cfg, tx, labels)
    state, out = jax.jit(step)(state, _batch(cfg, b=8), np.array([6], np.int32))
    outs.append((float(out["loss"]), jax.device_get(state["params"])))
  assert abs(outs[0][0] - outs[1][0]) < 1e-5
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                       outs[0][1], outs[1][1]))
  assert max(diffs) < 1e-5


def test_list_of_m_averages_losses():
  rules = config_lib.STAGE2_RULES  # The query transformer and the LLM train.
  _, cfg, model, tx, labels, step = _setup(rules)
  state = _state(model, cfg, tx, labels)
  batch = _batch(cfg)
  single = [float(jax.jit(step)(state, batch, np.array([m], np.int32))[1]["loss"]) for m in (2, 9)]
  both = float(jax.jit(step)(state, batch, np.array([2, 9], np.int32))[1]["loss"])
  assert abs(both - np.mean(single)) < 1e-5


def test_m_sampler_kinds_and_validation():
  s = matryoshka.MSampler("log_uniform", 256, seed=1)
  draws = [int(s.sample(i)[0]) for i in range(500)]
  assert min(draws) >= 1 and max(draws) <= 256 and np.median(draws) < 64
  assert matryoshka.MSampler("fixed", 256).sample(3).tolist() == [256]
  assert matryoshka.MSampler("list", 16, ms=(1, 4)).sample(0).tolist() == [1, 4]
  assert np.array_equal(s.sample(7), matryoshka.MSampler("log_uniform", 256, seed=1).sample(7))
  with pytest.raises(ValueError, match=r"m=300 is out of range: 1 <= m <= M=256"):
    matryoshka.MSampler("fixed", 256, m=300)
  with pytest.raises(ValueError, match="unknown matryoshka kind 'sometimes'"):
    matryoshka.MSampler("sometimes", 256)


def test_optimizer_rule_errors_name_the_parameter():
  with pytest.raises(ValueError, match=r"parameter vision/.* matches no optimizer rule"):
    _setup((("^query/", 1.0), ("^llm/", 1.0)))


def _row_nll(model, params, batch, m, num_latents):
  """Summed next-token loss of each row [B] (model.apply with num_latents)."""
  from mqt.model import token_nll
  hidden, layout = model.apply({"params": params}, batch["images"], batch["input_ids"],
                               batch["text_mask"], m, num_latents=num_latents,
                               return_hidden=True)
  logits = model.apply({"params": params}, hidden[:, :-1], method=MQTLLaVA.head)
  target = layout.gather_labels(jnp.asarray(batch["labels"]))[:, 1:]
  return token_nll(logits, target).sum(axis=1)


def test_a_bucketed_step_gives_each_sample_the_loss_of_the_single_shape_step():
  # A step in bucket n runs n latents and T + n - 1 slots instead of M and T + M - 1;
  # the latents past m are masked either way, so each row's loss is the same.
  _, cfg, model, tx, labels, step = _setup(config_lib.STAGE2_RULES, eps=1e-3)
  state = _state(model, cfg, tx, labels)
  batch = _batch(cfg)
  sampler = matryoshka.MSampler("uniform", cfg.query.num_queries,
                                buckets=matryoshka.pow2_buckets(cfg.query.num_queries))
  nll = jax.jit(_row_nll, static_argnums=(0, 4))
  big_m = cfg.query.num_queries
  assert big_m >= 8
  for m in (1, 3, 4, 7, big_m):
    n = sampler.bucket([m])
    assert n >= m and (n == 1 or n // 2 < m)
    full = np.asarray(nll(model, state["params"], batch, m, None))
    bucketed = np.asarray(nll(model, state["params"], batch, m, n))
    assert np.all(full > 0), full  # Every row holds labelled tokens.
    np.testing.assert_allclose(bucketed, full, rtol=2e-6, atol=1e-5)
  # The whole step (loss, gradients, AdamW update) agrees as well.
  bucketed = make_train_step(model, tx, labels, 1, num_latents=4)
  ms = np.array([3], np.int32)
  s1, o1 = jax.jit(step)(state, batch, ms)
  s2, o2 = jax.jit(bucketed)(state, batch, ms)
  assert abs(float(o1["loss"]) - float(o2["loss"])) < 1e-5
  assert int(o1["tokens"]) == int(o2["tokens"])
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                       s1["params"], s2["params"]))
  assert max(diffs) < 1e-5


def test_bucketed_training_compiles_once_per_bucket_it_reaches():
  config, cfg, model, tx, labels, _ = _setup(config_lib.STAGE2_RULES)
  state = _state(model, cfg, tx, labels)
  big_m = cfg.query.num_queries
  sampler = matryoshka.MSampler("uniform", big_m, seed=3, buckets=(2, 4))
  assert sampler.buckets == (2, 4, big_m) and sampler.reachable_buckets() == (2, 4, big_m)
  steps = {n: jax.jit(make_train_step(model, tx, labels, 1, num_latents=n), donate_argnums=(0,))
           for n in sampler.buckets}
  batch = _batch(cfg)
  used = []
  with count_compiles() as compiles:
    for i in range(12):
      ms = sampler.sample(i)
      used.append(sampler.bucket(ms))
      state, out = steps[used[-1]](state, batch, ms)
  assert compiles() == len(set(used)) <= 3 and len(set(used)) >= 2, used
  assert np.isfinite(float(out["loss"]))


def test_bucket_sizes_are_checked_and_official_m_skips_bucket_one():
  assert matryoshka.pow2_buckets(16) == (1, 2, 4, 8, 16)
  assert matryoshka.pow2_buckets(24, smallest=4) == (4, 8, 16, 24)
  s = matryoshka.MSampler("official", 16, buckets=(1, 2, 4, 8))
  assert s.reachable_buckets() == (2, 4, 8, 16)  # Official m is even: bucket 1 is unused.
  assert matryoshka.MSampler("fixed", 16, m=3, buckets=(4,)).reachable_buckets() == (4,)
  assert matryoshka.MSampler("list", 16, ms=(1, 5), buckets=(4, 8)).bucket([1, 5]) == 8
  with pytest.raises(ValueError, match=r"bucket size 20 is out of range: .* 1\.\.M=16"):
    matryoshka.MSampler("uniform", 16, buckets=(4, 20))
  config = tiny.get_config()
  cfg = ModelConfig.from_config(config.model)
  with config.unlocked():
    config.stage2.matryoshka.buckets = (0, 8)
  with pytest.raises(ValueError, match=r"--config\.stage2\.matryoshka\.buckets=\(0, 8\): "
                                       r"bucket size 0"):
    plan.stage_sampler(config, 2, cfg)
