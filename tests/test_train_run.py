"""Run-level behaviour of mqt.train: clear errors before compute, non-finite loss stops a run.

Runs `train_and_evaluate` in this process on the built-in data at tiny sizes.
"""
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import mqt_llava, tiny
from mqt import train
from mqt import params as params_lib
from mqt import run_inputs


def _tiny(tmp_path, data_dir, **stage1):
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.data.builtin_sizes.update(dict(captions=32, instruct=32, eval=12))
  config.run_stages = "1"
  config.stage1.data.batch_size = 8
  config.checkpoint.every = 1
  config.checkpoint.use_async = False
  config.log_every = 1
  config.eval.ms = ()
  for k, v in stage1.items():
    config.stage1[k] = v
  return config


def test_missing_paths_are_named_before_any_compute(tmp_path):
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(mqt_llava.get_config("stage=1"), str(tmp_path / "s1"))
  msg = str(err.value)
  for field in ("--config.stage1.data.json_path is not set",
                "--config.stage1.data.image_folder is not set",
                "--config.eval.data.json_path is not set",
                "--config.tokenizer_path is not set", "--config.init.clip is not set",
                "--config.init.llm is not set"):
    assert field in msg, msg
  assert not (tmp_path / "s1").exists()  # Nothing was started.

  config = mqt_llava.get_config("stage=2")
  config.tokenizer_path = str(tmp_path / "absent" / "tokenizer.model")
  with pytest.raises(ValueError, match=r"--config.stage2.init_from is not set") as err:
    train.train_and_evaluate(config, str(tmp_path / "s2"))
  assert f"--config.tokenizer_path={config.tokenizer_path} does not exist" in str(err.value)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = _tiny(tmp_path, tmp_path / "data", steps=6)
  config.stage1.optim.lr = 1e30  # Adam steps of ~1e30: the next forward overflows.
  config.stage1.optim.warmup = 0
  with pytest.raises(train.NonFiniteLossError, match=r"\[stage1\] loss .* at step 2 .*"
                     r"last good checkpoint \(step 1\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  manager = ocp.CheckpointManager(str(tmp_path / "run" / "stage1" / "checkpoints"))
  assert manager.all_steps() == [1]
  state = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  leaves = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
  assert all(np.isfinite(x).all() for x in leaves)
  assert int(state["step"]) == 1


# Captions of the tiny built-in set have 18-45 text tokens: 48 - M + 1 = 40 rejects a few.
SKIP_MAX_LEN = 48


def test_summary_progress_and_skipped_records(tmp_path, capsys):
  """One run: the progress lines, the evaluation and summary.json; over-long captions
  (overlong=reject, on_error=skip) logged once per reason and counted by record."""
  config = _tiny(tmp_path, tmp_path / "data", steps=6)
  config.eval.ms = (1, 9)
  config.eval.data.batch_size = 12  # The mesh has 8 batch shards.
  config.data.overlong = "reject"
  config.data.on_error = "skip"
  config.stage1.data.max_len = SKIP_MAX_LEN
  with pytest.raises(ValueError, match=r"--config.eval.data.batch_size=12 does not divide over "
                     r"the 8 batch shards"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.eval.data.batch_size = 8
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "[stage1] step 6/6  loss" in out and "tok/s  ETA 0m00s" in out
  assert "held-out teacher-forced answer accuracy per m" in out
  assert math.isfinite(summary["stages"]["stage1"]["final_loss"])
  # Chance per question type comes from the held-out records (majority answer per form).
  assert set(summary["eval"]["chance"]) == set(summary["eval"]["accuracy"])
  assert all(0 < c <= 1 for c in summary["eval"]["chance"].values())
  assert os.path.exists(tmp_path / "run" / "summary.json")
  assert os.listdir(tmp_path / "run" / "stage1" / "tensorboard" / "stage1")
  lines = [x for x in out.splitlines() if "skipping records" in x]
  assert len(lines) == 1 and lines[0].startswith("[stage1] skipping records: overlong (first: ")
  data = summary["stages"]["stage1"]["data"]
  assert data["total"] == 32 and 0 < data["skipped"]["overlong"] == data["skipped_total"] < 32
  assert data["used"] == 32 - data["skipped_total"]
  assert "  skipped " in out  # The progress line's counter.


@pytest.mark.parametrize("processes,index,order", [
    (1, 0, ["prepare"]),
    (2, 0, ["prepare", "barrier"]),  # Process 0 prepares, then releases the others ...
    (2, 1, ["barrier", "prepare"]),  # ... who only look once it is done.
])
def test_builtin_data_is_prepared_by_process_0_before_the_others_look(
    tmp_path, monkeypatch, processes, index, order):
  from data import prepare  # pylint: disable=import-outside-toplevel
  events = []
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(run_inputs.multihost_utils, "sync_global_devices",
                      lambda name: events.append("barrier"))
  monkeypatch.setattr(prepare, "ensure_builtin",
                      lambda data_dir, **kw: events.append("prepare") or data_dir + "/root")
  config = _tiny(tmp_path, tmp_path / "data")
  assert run_inputs.prepare_builtin(config, str(tmp_path)) == str(tmp_path / "data") + "/root"
  assert events == order



def test_stage2_reinit_starts_the_matching_parameters_afresh(tmp_path):
  """configs/tiny.py's stage 2: the LLM starts from a fresh random init (not stage 1's),
  trains alone; the tower and query transformer carry over from stage 1 bitwise."""
  from flax import traverse_util
  from mqt.model import MQTLLaVA, ModelConfig
  config = _tiny(tmp_path, tmp_path / "data", steps=2)
  config.run_stages = "1,2"
  config.stage2.steps = 1
  config.stage2.optim.lr = 0.0  # Stage 2 changes nothing itself: what it starts from shows.
  config.stage2.data.batch_size = 8
  assert config.stage2.reinit == "^llm/"
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["stages"]["stage2"]["steps"] == 1

  from flax import linen as nn
  from mqt import sharding as shard_lib
  model_cfg = ModelConfig.from_config(config.model)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  rules = tuple(config.sharding.logical_axis_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    flat = lambda p: traverse_util.flatten_dict(jax.device_get(p), sep="/")
    one, two = (flat(params_lib.load_params(str(tmp_path / "run" / s / "checkpoints"), model_cfg,
                                       mesh, config)) for s in ("stage1", "stage2"))
    shardings = params_lib.param_shardings(model_cfg, mesh, rules)
    fresh = flat(params_lib.random_params(config.seed + 2, model_cfg, MQTLLaVA(model_cfg),
                                      shardings))
    part = flat(params_lib.random_params(config.seed + 2, model_cfg, MQTLLaVA(model_cfg),
                                     shardings, only="^llm/"))
  assert set(part) == {k for k in fresh if k.startswith("llm/")} and part
  for path, value in part.items():  # The partial init is the same draw as the full one.
    np.testing.assert_array_equal(value, fresh[path], err_msg=path)
  for path in one:
    if path.startswith("llm/"):
      np.testing.assert_array_equal(two[path], fresh[path], err_msg=path)
      assert not np.array_equal(two[path], one[path]), path
    else:
      np.testing.assert_array_equal(two[path], one[path], err_msg=path)
  with pytest.raises(ValueError, match=r"stage2.reinit='\^lm/' matches no parameter"):
    params_lib.reinit_params({"llm": {"w": np.zeros(2)}}, "^lm/", {"llm": {"w": np.ones(2)}},
                        "stage2")


def test_m_out_of_range_is_named_before_any_training(tmp_path):
  config = _tiny(tmp_path, tmp_path / "data", steps=2)
  config.eval.ms = (1, 10)
  with pytest.raises(ValueError, match=r"^--config.eval.ms=\(1, 10\): m=10 is out of range"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.eval.ms = ()
  config.run_stages = "1,2"
  config.stage2.matryoshka.kind = "fixed"
  config.stage2.matryoshka.m = 12
  with pytest.raises(ValueError, match=r"^--config.stage2.matryoshka.m=12: m=12 is out of "):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "stage1")  # Stage 1 never started.


def test_the_evaluation_is_skipped_for_user_data_without_held_out_data(tmp_path):
  config = _tiny(tmp_path, tmp_path / "data")
  assert run_inputs.eval_skip_reason(config) is None  # Built-in training keeps its evaluation.
  config.stage1.data.kind = "json"
  reason = run_inputs.eval_skip_reason(config)
  assert reason.startswith("stage1 trains on your data (kind json) but config.eval.data is "
                           "the built-in synthetic set; set --config.eval.data.json_path=")
  config.eval.data.kind = "json"
  assert run_inputs.eval_skip_reason(config) is None
