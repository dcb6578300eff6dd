"""Training memory: optimizer state sharded like its parameters, --dry_run, and a run
that cannot fit stops before it allocates anything."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from mqt import memory as mem_lib
from mqt import optim
from mqt import params as params_lib
from mqt import plan
from mqt import run_inputs
from mqt import sharding as shard_lib
from mqt import train
from mqt.model import ModelConfig, MQTLLaVA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("peak_bytes_per_device", "params_bytes_per_device", "opt_state_bytes_per_device",
        "temp_bytes_per_device")


def _abstract_state(config, mesh, stage="stage1"):
  model_cfg = ModelConfig.from_config(config.model)
  params = params_lib.abstract_sharded_params(model_cfg, mesh,
                                             config.sharding.logical_axis_rules)
  tx, labels, _ = optim.make_optimizer(params, config[stage].optim, 10)
  make_state = params_lib.state_initializer(tx, labels)
  return params, labels, make_state, params_lib.abstract_train_state(make_state, params, labels, mesh)


def test_every_optimizer_state_leaf_is_sharded_like_its_parameter():
  config = tiny.get_config()  # Stage 1 trains every parameter.
  mesh = shard_lib.make_mesh(dict(data=1, fsdp=4, tensor=2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.logical_axis_rules)):
    params, labels, make_state, abstract = _abstract_state(config, mesh)
    trainable, _ = optim.partition(params, labels)
    seen = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract["opt_state"]):
      key = next((k.key for k in reversed(path) if getattr(k, "key", None) in trainable), None)
      if key is None:  # Adam's step count.
        assert leaf.shape == () and leaf.sharding.is_fully_replicated, path
        continue
      param = trainable[key]
      assert leaf.shape == param.shape and leaf.sharding == param.sharding, path
      seen[key] = seen.get(key, 0) + 1
    assert seen == {k: 2 for k in trainable}  # mu and nu of every trainable parameter.
    sharded = [k for k, p in trainable.items() if not p.sharding.is_fully_replicated]
    assert "llm/layers_0/q_proj/kernel" in sharded and len(sharded) > len(trainable) // 2
    # Per device: a quarter of the parameters (fsdp=4) at most, not all of them.
    total = sum(p.size * p.dtype.itemsize for p in trainable.values())
    assert mem_lib.shard_bytes(abstract["opt_state"]) < 0.6 * 2 * total
    # The state a run creates has exactly these shardings.
    model_cfg = ModelConfig.from_config(config.model)
    real = params_lib.random_params(0, model_cfg, MQTLLaVA(model_cfg),
                                params_lib.shardings_of(abstract["params"]))
    state = jax.jit(make_state, out_shardings=params_lib.shardings_of(abstract))(real)
    for got, want in zip(jax.tree.leaves(state["opt_state"]),
                         jax.tree.leaves(abstract["opt_state"])):
      assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_dry_run_writes_the_memory_per_device_without_data_or_weights(tmp_path):
  workdir = tmp_path / "dry"
  # The data block names files that do not exist: a dry run reads none of them.
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", "--dry_run", "--config.run_stages=2",
         "--config.sharding.mesh.data=2", "--config.sharding.mesh.fsdp=4",
         "--config.stage2.data.kind=json", "--config.stage2.accum_steps=2",
         f"--config.stage2.data.json_path={tmp_path / 'absent.json'}",
         f"--config.tokenizer_path={tmp_path / 'absent.model'}",
         "--config.init.kind=hf", f"--config.init.mqt_llava={tmp_path / 'absent_ckpt'}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[stage2] train step per device (8 cpu devices): parameters" in proc.stdout
  assert "fits TPU v5e (16 GiB): yes" in proc.stdout
  report = json.loads((workdir / "dry_run.json").read_text())
  assert report["devices"] == 8 and set(report["stages"]) == {"stage2"}
  mem = report["stages"]["stage2"]
  assert all(mem[k] > 0 for k in KEYS), mem
  assert mem["peak_bytes_per_device"] >= (mem["params_bytes_per_device"]
                                          + mem["opt_state_bytes_per_device"])
  assert sorted(os.listdir(workdir)) == ["dry_run.json"]  # No data, no checkpoint.


def test_a_step_that_does_not_fit_stops_before_any_parameter_exists(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path / "data")
  config.run_stages = "1"
  config.stage1.data.batch_size = 8
  config.eval.ms = ()
  config.device_memory_gib = 0.001  # About 1 MiB: the tiny step needs more.
  touched = []
  for module, name in ((train, "fresh_params"), (train, "random_params"),
                       (train, "load_params"), (run_inputs, "open_source")):
    monkeypatch.setattr(module, name, lambda *a, _n=name, **k: touched.append(_n))
  with pytest.raises(plan.StepDoesNotFitError,
                     match=r"\[stage1\] the train step needs [\d.]+ MiB per device \(parameters "
                     r"[\d.]+ MiB, optimizer state [\d.]+ MiB, temporaries [\d.]+ MiB\), more "
                     r"than the 1.0 MiB of config.device_memory_gib=0.001; stopped before "
                     r"allocating any parameter"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert touched == []
  assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "stage1").exists()


def test_memory_line_names_the_limit_it_checks():
  mem = {"params_bytes_per_device": 2**30, "opt_state_bytes_per_device": 2 * 2**30,
         "temp_bytes_per_device": 5 * 2**30, "peak_bytes_per_device": 9 * 2**30}
  line = plan.memory_line("stage2", mem, 80 * 2**30, "config.device_memory_gib=80")
  assert line.endswith("peak 9.00 GiB; fits in 80.00 GiB (config.device_memory_gib=80)"), line
  line = plan.memory_line("stage2", mem, 8 * 2**30, "the H100's bytes_limit")
  assert "does NOT fit in 8.00 GiB (the H100's bytes_limit)" in line
  line = plan.memory_line("stage2", mem, None, "none")
  assert "TPU v5e (16 GiB): yes" in line and "A100 40GB (40 GiB): yes" in line
  assert np.isclose(mem_lib.device_memory_limit(tiny.get_config())[0] or 0, 0)  # CPU: none.


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_equals_the_loss_of_full_logits(chunk):
  """Value and gradient; chunk 7 leaves a padded last chunk, 4096 is one chunk."""
  from mqt.model import IGNORE, MQTLLaVA, chunked_next_token_loss, next_token_loss
  from tests.test_train_step import _batch
  model_cfg = ModelConfig.from_config(tiny.get_config().model)
  model = MQTLLaVA(model_cfg)
  batch = _batch(model_cfg, b=4, t=12)
  params = params_lib.random_params(0, model_cfg, model, None)
  args = (batch["images"], batch["input_ids"], batch["text_mask"], 5)

  def full(p):
    logits, layout = model.apply({"params": p}, *args)
    return next_token_loss(logits, layout, batch["labels"])[1]["loss_sum"]

  def chunked(p):
    hidden, layout = model.apply({"params": p}, *args, return_hidden=True)
    head = lambda x: model.apply({"params": p}, x, method=MQTLLaVA.head)
    return chunked_next_token_loss(head, hidden, layout, batch["labels"], chunk)[1]["loss_sum"]

  (want, g_want), (got, g_got) = (jax.jit(jax.value_and_grad(f))(params)
                                  for f in (full, chunked))
  assert (batch["labels"] != IGNORE).sum() > 10
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  # float32 rounding only (matmuls of other shapes), against the largest gradient entry
  # (per leaf it would not do: a key bias's gradient is 0 up to rounding).
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g_want))
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                          g_got, g_want)))
  assert diff < 2e-6 * scale, (diff, scale)


@pytest.mark.parametrize("devices, budgets_gib", [(64, {"stage1": 12, "stage2": 10}),
                                                  (8, {"stage2": 60})])
def test_the_7b_recipe_fits_its_budget_per_device(tmp_path, devices, budgets_gib):
  """configs/mqt_llava.py as shipped (batch 256 / 128 of 2,048 tokens, float32 parameters
  and Adam), compiled on fake CPU devices: the peak per device stays within the budget
  the README states, and the dry run itself stays small on the host."""
  stages = ",".join(s[-1] for s in budgets_gib)
  # The dry run is started by a small Python process that reports its child's peak
  # resident memory: a child forked straight from this test process would count this
  # process's memory at the fork in its own peak.
  probe = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print('child_maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(code)")
  cmd = [sys.executable, "-c", probe, sys.executable, os.path.join(ROOT, "train.py"),
         "--config=configs/mqt_llava.py:stage=1", f"--config.run_stages={stages}",
         f"--workdir={tmp_path}", "--dry_run"]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "dry_run.json").read_text())
  assert report["devices"] == devices and set(report["stages"]) == set(budgets_gib)
  for stage, budget in budgets_gib.items():
    peak = report["stages"][stage]["peak_bytes_per_device"]
    assert peak <= budget * 2**30, (stage, devices, peak / 2**30)
  maxrss_kib = int(proc.stdout.rsplit("child_maxrss_kib", 1)[1])
  assert maxrss_kib < 4 * 2**20, maxrss_kib  # Under 4 GiB of host memory.
