"""A budget -> m (mqt/budget.py), latency.py, and the budgets of predict.py."""
import concurrent.futures
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from configs import tiny
from data import tokenizer as tokenizer_lib
from mqt import budget
from mqt import checkpoint as ckpt_lib
from mqt import config_lib
from mqt import flops as flops_lib
from mqt import inference
from mqt import run_inputs
from mqt.model import MQTLLaVA, ModelConfig, dummy_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig.from_config(tiny.get_config().model)  # M = 9.
HERE = "test-device x1"


def _hand_flops(m, text_len, new):
  f = flops_lib.flops_per_m(CFG, text_len, m, new)
  return f["prefill"] + new * f["llm_decode_per_token"]


# ---------------------------------------------------------------------------
# FLOPs.

def test_sample_flops_is_the_prefill_plus_every_decoded_token():
  for m in (1, 5, 9):
    assert budget.sample_flops(CFG, m, 40, 16) == _hand_flops(m, 40, 16)
  costs = [_hand_flops(m, 40, 16) for m in range(1, 10)]
  assert costs == sorted(costs) and len(set(costs)) == 9  # Strictly growing in m.


@pytest.mark.parametrize("text_len,new", [(40, 16), (12, 3)])
def test_m_for_flops_picks_the_largest_m_that_fits(text_len, new):
  costs = {m: _hand_flops(m, text_len, new) for m in range(1, 10)}
  for m in range(1, 10):
    assert budget.m_for_flops(CFG, costs[m], text_len, new) == m  # Exactly at the boundary.
    if m < 9:
      between = (costs[m] + costs[m + 1]) / 2
      chosen = budget.m_for_flops(CFG, between, text_len, new)
      assert chosen == m and costs[chosen] <= between < costs[chosen + 1]
      assert budget.m_for_flops(CFG, costs[m + 1] - 1, text_len, new) == m
  assert budget.m_for_flops(CFG, 1e30, text_len, new) == 9  # Never above M.


def test_a_flops_budget_below_m1_or_malformed_is_named():
  cost = _hand_flops(1, 40, 16)
  with pytest.raises(budget.BudgetError) as e:
    budget.m_for_flops(CFG, cost - 1, 40, 16)
  assert str(e.value) == (f"FLOPs budget {cost - 1:.4g} is below the {cost:.4g} FLOPs of one "
                          f"sample at m=1 (prompt 40 tokens, 16 new tokens)")
  for bad in (0, -5, math.nan, math.inf, "lots"):
    with pytest.raises(budget.BudgetError, match="FLOPs budget"):
      budget.m_for_flops(CFG, bad, 40, 16)


# ---------------------------------------------------------------------------
# Latency tables.

def _table(ms, **kw):
  args = dict(device=HERE, text_len=40, max_new_tokens=16, batch_size=1, ms=ms)
  return budget.LatencyTable(**{**args, **kw})


def test_latency_is_interpolated_between_measured_m_only():
  t = _table({1: 10.0, 2: 12.0, 4: 20.0, 8: 36.0})
  assert t.latency_at(3) == pytest.approx(16.0, abs=1e-9)
  assert t.latency_at(6) == pytest.approx(28.0, abs=1e-9)
  assert t.m_for(16.0, 9) == 3 and t.m_for(15.99, 9) == 2
  assert t.m_for(12.0, 9) == 2 and t.m_for(10.0, 9) == 1
  assert t.m_for(1e9, 9) == 8  # Above the largest measured m nothing is assumed.
  with pytest.raises(ValueError, match="m=9 lies outside the measured m 1..8"):
    t.latency_at(9)
  with pytest.raises(budget.BudgetError) as e:
    t.m_for(9.5, 9)
  assert str(e.value) == ("latency budget 9.5 ms is below the 10 ms measured at m=1, the "
                          "smallest m of the latency table")
  low = _table({2: 12.0, 4: 20.0})
  with pytest.raises(budget.BudgetError, match="below the 12 ms measured at m=2"):
    low.m_for(11.0, 9)  # Below the smallest measured m nothing is assumed either.
  with pytest.raises(ValueError, match="holds m=8, more than this model's M=4"):
    t.m_for(20.0, 4)
  for bad in (0, -1, math.nan, math.inf):
    with pytest.raises(budget.BudgetError, match="latency budget"):
      t.m_for(bad, 9)


def test_every_m_is_checked_when_latency_is_not_monotone():
  t = _table({1: 10.0, 2: 30.0, 4: 20.0})  # Noise: m=2 measured slower than m=4.
  assert t.m_for(21.0, 9) == 4  # m=3 interpolates to 25 and is skipped.
  assert t.m_for(26.0, 9) == 4 and t.m_for(19.0, 9) == 1


def test_tables_round_trip_and_bad_tables_are_named(tmp_path):
  t = _table({1: 10.5, 4: 20.25, 9: 40.0}, checkpoint="/ckpt", measured_at="2024-01-01T00:00")
  path = str(tmp_path / "latency.json")
  t.save(path)
  raw = json.loads(open(path).read())
  assert set(raw) == {"device", "text_len", "max_new_tokens", "batch_size", "ms", "checkpoint",
                      "measured_at"}
  back = budget.LatencyTable.load(path, device=HERE)
  assert back == t and back.path == path and list(back.ms) == [1, 4, 9]
  with pytest.raises(ValueError) as e:
    budget.LatencyTable.load(path, device="gpu H100 x1")
  assert str(e.value) == (f"latency table {path} was measured on {HERE}, not on this machine's "
                          f"gpu H100 x1: measure one here with `python latency.py`")
  with pytest.raises(ValueError, match="not on this machine's " + budget.device_name()):
    budget.LatencyTable.load(path)  # Default: this process's device.
  missing = str(tmp_path / "none.json")
  with pytest.raises(ValueError) as e:
    budget.LatencyTable.load(missing)
  assert str(e.value) == (f"no latency table at {missing}: measure one with `python latency.py "
                          f"--config=... --workdir=...`")
  for name, text, why in (("corrupt.json", '{"device": ', "Expecting value"),
                          ("keys.json", '{"device": "x", "ms": {"1": 2}}',
                           "it lacks text_len, max_new_tokens, batch_size"),
                          ("values.json", json.dumps({**raw, "ms": {"1": -2}}),
                           "positive milliseconds")):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as e:
      budget.LatencyTable.load(str(tmp_path / name), device=HERE)
    assert str(e.value).startswith(f"latency table {tmp_path / name} is not a valid table (")
    assert why in str(e.value)


def test_table_path():
  assert budget.table_path("/w/stage2/checkpoints", "/w") == "/w/stage2/checkpoints/latency.json"
  assert budget.table_path("hf", "/w") == "/w/latency_hf.json"


# ---------------------------------------------------------------------------
# choose_m.

def test_choose_m_takes_exactly_one_request():
  t = _table({1: 10.0, 4: 20.0})
  for kw, got in (({}, "none"), (dict(m=2, flops_budget=1e9), "m=2, flops_budget=1000000000.0"),
                  (dict(m=2, flops_budget=1e9, latency_budget_ms=5.0, table=t),
                   "m=2, flops_budget=1000000000.0, latency_budget_ms=5.0")):
    with pytest.raises(budget.BudgetError) as e:
      budget.choose_m(CFG, 40, 16, **kw)
    assert str(e.value) == ("give exactly one of m, flops_budget, latency_budget_ms "
                            f"(got {got})")
  assert budget.choose_m(CFG, 40, 16, m=3) == (
      3, f"m=3: as asked ({_hand_flops(3, 40, 16):.4g} FLOPs per sample, prompt 40 tokens, "
         f"up to 16 new tokens)")
  with pytest.raises(budget.BudgetError, match="m=10 is out of range"):
    budget.choose_m(CFG, 40, 16, m=10)
  cost = _hand_flops(5, 40, 16)
  m, why = budget.choose_m(CFG, 40, 16, flops_budget=cost)
  assert m == 5 and why.startswith(f"m=5: the largest m whose {cost:.4g} FLOPs per sample fit")
  assert budget.choose_m(CFG, 40, 16, flops_budget=1e30)[1].startswith("m=9: the largest m (= M)")
  with pytest.raises(budget.BudgetError, match="a latency budget needs a latency table"):
    budget.choose_m(CFG, 40, 16, latency_budget_ms=5.0)
  with pytest.raises(budget.BudgetError, match="measured decoding 16 tokens, but this run "
                     "decodes up to 20: measure one with `python latency.py "
                     "--max_new_tokens=20`"):
    budget.choose_m(CFG, 40, 20, latency_budget_ms=5.0, table=t)
  assert budget.choose_m(CFG, 40, 8, latency_budget_ms=15.0, table=t)[1].endswith(
      "; this run decodes up to 8 tokens, fewer than the table's 16: the latency is "
      "overestimated")
  m, why = budget.choose_m(CFG, 40, 16, latency_budget_ms=15.0, table=t)
  assert (m, why) == (2, f"m=2: the largest m whose 13.33 ms (interpolated; batch 1, prompt 40 "
                         f"tokens, 16 new tokens, {HERE}) fits the budget 15 ms")
  m, why = budget.choose_m(CFG, 50, 16, latency_budget_ms=99.0, table=t)
  assert m == 4 and why.startswith("m=4: the largest measured m whose 20 ms (measured;")
  assert why.endswith("this prompt has 50 tokens, more than the table's 40: the latency is "
                      "underestimated")


# ---------------------------------------------------------------------------
# The commands, end to end on a tiny checkpoint of random weights.

SMALL = ["--config.model.llm.depth=1", "--config.model.llm.mlp_dim=64"]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
  """(root, command-line args) of a smaller model's checkpoint where predict.py finds it
  (random weights saved as train.py saves them), with the built-in tokenizer."""
  root = tmp_path_factory.mktemp("budget")
  config = tiny.get_config()
  config.model.llm.depth, config.model.llm.mlp_dim = 1, 64
  config.data.data_dir = str(root / "data")
  config.data.builtin_sizes.update(dict(captions=8, instruct=8, eval=8))
  config.run_stages = "1"
  workdir = str(root / "w")
  run_inputs.open_source(config, config.stage1.data, workdir)  # Data + tokenizer.
  model_cfg = ModelConfig.from_config(config.model)
  params = nn.unbox(MQTLLaVA(model_cfg).init(jax.random.key(0), *dummy_inputs(model_cfg),
                                             16))["params"]
  saver = ckpt_lib.Checkpointer(run_inputs.default_checkpoint(config, workdir), every=1, keep=1,
                                use_async=False)
  saver.save(1, {"params": params, "step": 1}, None, force=True)
  saver.close()
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(root / "img.png")
  args = ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.run_stages=1",
          f"--config.data.data_dir={root / 'data'}", *SMALL]
  tok = tokenizer_lib.Tokenizer.load(run_inputs.tokenizer_path(config, config.eval.data,
                                                                workdir))
  return root, args, config, tok


def _run(script, args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)


def _errors(proc):
  return [x for x in proc.stderr.splitlines() if x.startswith("error: ")]


def test_predict_and_latency_commands_choose_m(small_ckpt):
  root, args, config, tok = small_ckpt
  question = "What color is the circle?"
  prompt_len = len(inference.encode_prompt(question, tok, True, config.eval.data.template))
  model_cfg = ModelConfig.from_config(config.model)
  cost3 = budget.sample_flops(model_cfg, 3, prompt_len, 3)
  pred = [*args, f"--image={root / 'img.png'}", f"--prompt={question}", "--max_new_tokens=3"]
  ckpt = root / "w" / "stage1" / "checkpoints"
  table = str(ckpt / "latency.json")
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    by_flops = pool.submit(_run, "predict.py", pred + [f"--flops_budget={cost3}"])
    measured = pool.submit(_run, "latency.py", args + ["--ms=1,4", "--repeats=1",
                                                       "--max_new_tokens=3", "--text_len=40"])
    unmet = pool.submit(_run, "predict.py", pred + ["--flops_budget=1000"])
    bad_ms = pool.submit(_run, "latency.py", args + ["--ms=1,12"])
    both = pool.submit(_run, "evaluate.py", args + ["--ms=1,2", "--flops_budget=1e9"])
    by_flops, measured = by_flops.result(), measured.result()
    unmet, bad_ms, both = unmet.result(), bad_ms.result(), both.result()
  assert by_flops.returncode == 0, by_flops.stderr[-3000:]
  assert len(by_flops.stdout.splitlines()) == 1  # Only the answer on stdout.
  assert (f"m=3: the largest m whose {cost3:.4g} FLOPs per sample fit the budget {cost3:.4g} "
          f"(prompt {prompt_len} tokens, up to 3 new tokens)") in by_flops.stderr
  assert measured.returncode == 0, measured.stderr[-3000:]
  lines = measured.stdout.splitlines()
  assert lines[-1] == f"latency table written to {table}"
  assert [x.split()[0] for x in lines if x.startswith("m=")] == ["m=1", "m=4"]
  raw = json.loads(open(table).read())
  assert (raw["text_len"], raw["max_new_tokens"], raw["batch_size"]) == (40, 3, 1)
  assert sorted(raw["ms"]) == ["1", "4"] and all(v > 0 for v in raw["ms"].values())
  assert raw["checkpoint"] == str(ckpt) and raw["device"].startswith("cpu cpu x1, ")
  max_text = config_lib.max_text_len(config, config.eval.data)
  cost2 = budget.sample_flops(model_cfg, 2, max_text, config.eval.generation.max_new_tokens)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    by_latency = pool.submit(_run, "predict.py", pred + ["--latency_budget_ms=1e6"])
    sweep = pool.submit(_run, "evaluate.py", args + [f"--flops_budget={cost2}", "--dry_run"])
    by_latency, sweep = by_latency.result(), sweep.result()
  assert by_latency.returncode == 0, by_latency.stderr[-3000:]
  assert len(by_latency.stdout.splitlines()) == 1
  assert "m=4: the largest measured m whose " in by_latency.stderr  # Not above m=4.
  cost1 = budget.sample_flops(model_cfg, 1, prompt_len, 3)
  assert unmet.returncode == 2 and _errors(unmet) == [
      f"error: FLOPs budget 1000 is below the {cost1:.4g} FLOPs of one sample at m=1 (prompt "
      f"{prompt_len} tokens, 3 new tokens)"], unmet.stderr[-3000:]
  assert "memory of" not in unmet.stderr and "Traceback" not in unmet.stderr
  assert bad_ms.returncode == 2 and _errors(bad_ms) == [
      "error: --ms=1,12: m=12 is out of range: 1 <= m <= M=9 (M: "
      "--config.model.query.num_queries)"], bad_ms.stderr[-3000:]
  assert "memory of" not in bad_ms.stderr
  assert both.returncode == 2 and _errors(both) == [
      "error: give at most one of --ms, --flops_budget, --latency_budget_ms (got --ms=1,2 and "
      "--flops_budget=1e+09)"], both.stderr[-3000:]
  assert sweep.returncode == 0, sweep.stderr[-3000:]
  assert sweep.stdout.startswith(  # A dry run prices the longest prompt the config allows.
      f"m=2: the largest m whose {cost2:.4g} FLOPs per sample fit the budget {cost2:.4g} "
      f"(prompt {max_text} tokens, up to 16 new tokens)\n"), sweep.stdout
  assert "memory of a generation run at m=2," in sweep.stderr
