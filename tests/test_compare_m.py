"""bench/compare_m.py: the runs it plans, and the table and plot it makes of their results."""
import json
import os

import pytest
from PIL import Image

from bench import compare_m
from configs import tiny

MS = (1, 2, 4, 9)


def test_plan_shares_the_fixed_stage_and_varies_only_the_last():
  config = tiny.get_config()
  pre, runs = compare_m.plan(config, "configs/tiny.py", "/r", [0, 1], [1, 2, 9],
                             ["official", "log_uniform", "perceiver", "frozen_query"],
                             ["--config.x=1"])
  assert set(pre) == {"early_seed0", "early_seed1", "early_perceiver"}
  assert "--config.run_stages=1" in pre["early_seed1"] and "--config.seed=1" in pre["early_seed1"]
  assert "--config=configs/tiny.py:variant=perceiver" in pre["early_perceiver"]
  assert set(runs) == {"matryoshka_seed0", "matryoshka_seed1", "fixed_seed0", "fixed_seed1",
                       "specialist_m1", "specialist_m2", "official", "log_uniform", "perceiver",
                       "frozen_query"}
  for name, args in runs.items():
    assert "--config.run_stages=2" in args and "--config.x=1" in args
    assert "--config.data.data_dir=/r/data" in args
    early = "early_perceiver" if name == "perceiver" else (
        "early_seed1" if name.endswith("seed1") else "early_seed0")
    assert f"--config.stage2.init_from=/r/{early}/stage1/checkpoints" in args, (name, args)
  assert not any("matryoshka.kind" in a for a in runs["matryoshka_seed0"])  # The recipe as is.
  assert {"--config.stage2.matryoshka.kind=fixed", "--config.stage2.matryoshka.m=0"} <= set(
      runs["fixed_seed1"])
  assert "--config.stage2.matryoshka.m=2" in runs["specialist_m2"]
  assert "--config.stage2.matryoshka.kind=log_uniform" in runs["log_uniform"]
  assert "--config=configs/tiny.py:train_query=false" in runs["frozen_query"]


def test_plan_refuses_what_it_cannot_share_or_run():
  config = tiny.get_config()
  config.stage1.matryoshka.kind = "uniform"
  with pytest.raises(ValueError, match=r"stage1 samples m \(uniform, m=0\).*must run at m = M"):
    compare_m.plan(config, "configs/tiny.py", "/r", [0], [], [])
  config = tiny.get_config()
  with pytest.raises(ValueError, match=r"--specialists: m=10 is out of range 1..M=9"):
    compare_m.plan(config, "configs/tiny.py", "/r", [0], [10], [])
  with pytest.raises(ValueError, match=r"--ablations: unknown \['causal'\]"):
    compare_m.plan(config, "configs/tiny.py", "/r", [0], [], ["causal"])


def _summary(root, name, acc_by_type, n=100):
  os.makedirs(os.path.join(root, name))
  acc = {t: {str(m): a for m, a in zip(MS, row)} for t, row in acc_by_type.items()}
  with open(os.path.join(root, name, "summary.json"), "w") as f:
    json.dump({"eval": {"ms": list(MS), "accuracy": acc, "count": {t: n for t in acc},
                        "chance": {"colour": 0.25, "position": 0.5}}}, f)


def test_report_tables_learned_types_with_standard_errors_and_plots(tmp_path):
  root = str(tmp_path)
  flat = lambda a: (a, a, a, a)
  runs = {"matryoshka_seed0": {"colour": (0.8, 0.8, 0.9, 0.9), "position": flat(0.5)},
          "matryoshka_seed1": {"colour": (0.6, 0.8, 0.9, 0.9), "position": flat(0.52)},
          "fixed_seed0": {"colour": (0.3, 0.4, 0.6, 1.0), "position": flat(0.5)},
          "fixed_seed1": {"colour": (0.3, 0.5, 0.6, 0.9), "position": flat(0.5)},
          "specialist_m1": {"colour": (0.75, 0.2, 0.2, 0.2), "position": flat(0.5)}}
  for name, acc in runs.items():
    _summary(root, name, acc)
  table = compare_m.report(root, tiny.get_config(), list(runs), [0, 1], [1, 9],
                           machine="wall 1 min")
  # position is at chance: left out of the mean and named.
  assert "mean accuracy over colour (chance 0.250)" in table
  assert "Left out" in table and "position 0.510" in table
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in table.splitlines() if line.startswith("| ")}
  # m = 1: mean 0.7 over seeds; binomial SE sqrt(.8*.2/100 + .6*.4/100) / 2 = 0.0316; half
  # the seeds' range 0.1.
  assert rows["matryoshka"][0] == "0.700 ± 0.032 (±0.100)"
  assert rows["fixed"][0] == "0.300 ± 0.032 (±0.000)"
  assert rows["matryoshka - fixed"] == ["+0.400", "+0.350", "+0.300", "-0.050"]
  # Specialists: m = 1 its own run, m = M the fixed run of the first seed.
  assert rows["specialist (trained at that m)"] == ["0.750 ± 0.043", "-", "-", "1.000 ± 0.000"]
  assert rows["matryoshka - specialist"][0] == "-0.050"
  result = json.load(open(os.path.join(root, "results.json")))
  assert result["machine"] == "wall 1 min" and result["aggregate"]["types"] == ["colour"]
  with Image.open(os.path.join(root, "accuracy_vs_m.png")) as png:
    assert png.format == "PNG" and png.size[0] > 500


def test_blind_chance_is_the_most_frequent_answer_per_type(tmp_path):
  path = tmp_path / "heldout.json"
  path.write_text(json.dumps([{"type": "kind", "answer": "a photo"}] * 3
                             + [{"type": "kind", "answer": "a digit"},
                                {"type": "flip", "answer": "no"}]))
  assert compare_m.blind_chance(str(path)) == {"kind": 0.75, "flip": 1.0}
  path.write_text(json.dumps([{"id": 1}]))
  assert compare_m.blind_chance(str(path)) == {}


def test_shared_overrides_reach_the_config_it_plans_from():
  config = compare_m._load_config(  # pylint: disable=protected-access
      "configs/tiny.py", ["--config.stage1.matryoshka.kind=uniform",
                          "--config.eval.data.json_path=/d/heldout.json",
                          "--config.data.max_len=80"])
  assert config.stage1.matryoshka.kind == "uniform" and config.data.max_len == 80
  assert config.eval.data.json_path == "/d/heldout.json"
  with pytest.raises(ValueError, match=r"--shared=--config.stage9.steps=1: the config has no "
                     r"field stage9.steps"):
    compare_m._load_config("configs/tiny.py", ["--config.stage9.steps=1"])  # pylint: disable=protected-access
