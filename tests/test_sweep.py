"""bench/sweep.py: runs side by side, tables from summary.json, failures reported."""
import os
import sys

import pytest

from bench import sweep

# Stands in for train.py: writes a summary.json whose colour accuracy is its argument,
# or exits 3 for "fail".
FAKE = """
import json, os, sys
wd, arg = sys.argv[1], sys.argv[2]
print("training", arg)
if arg == "fail":
  sys.exit(3)
os.makedirs(wd, exist_ok=True)
acc = {"colour": {"1": 0.25, "9": float(arg)}, "exist": {"1": 0.5, "9": 0.75}}
json.dump({"eval": {"accuracy": acc, "ms": [1, 9]}}, open(os.path.join(wd, "summary.json"), "w"))
"""


def test_sweep_runs_every_variant_and_reports_failures(tmp_path):
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE)
  root = str(tmp_path / "sweep")
  spec = {"a": ["0.5"], "b": ["1.0"], "broken": ["fail"]}
  command = lambda name, args: [sys.executable, str(script), os.path.join(root, name), *args]
  lines = []
  results = sweep.run_sweep(spec, root, parallel=2, command=command, poll_s=0.05,
                            log=lines.append)
  assert results["a"]["accuracy"] == {"colour": (0.5, 0.25), "exist": (0.75, 0.5)}
  assert results["b"]["accuracy"]["colour"] == (1.0, 0.25)
  assert results["broken"]["rc"] == 3 and "training fail" in results["broken"]["failed"]
  assert len(lines) == 3 and any("broken: FAILED (rc 3" in l for l in lines)
  assert "min)" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[-1]  # Time left.
  table = sweep.format_table(results)
  assert "accuracy at m = 9 / m = 1" in table
  row = next(l for l in table.splitlines() if l.startswith("b "))
  assert "1.00/0.25" in row and "0.75/0.50" in row
  assert "broken" not in table
  assert open(os.path.join(root, "a.log")).read().strip() == "training 0.5"


def test_spec_errors_name_the_file_and_the_run(tmp_path):
  bad = tmp_path / "s.json"
  for text, match in (("{", "not JSON"), ("[]", "non-empty object"),
                      ('{"a/b": []}', "'a/b' is not a plain folder name"),
                      ('{"a": "--x=1"}', "run 'a' wants a list of strings")):
    bad.write_text(text)
    with pytest.raises(ValueError, match=match):
      sweep.load_spec(str(bad))
  bad.write_text('{"d4": ["--config.model.llm.depth=4"]}')
  assert sweep.load_spec(str(bad)) == {"d4": ["--config.model.llm.depth=4"]}
  cmd = sweep.train_command("d4", ["--config.model.llm.depth=4"], "/r", "configs/tiny.py",
                            ["--config.checkpoint.every=5000"])
  assert cmd[1:] == ["train.py", "--config=configs/tiny.py", "--workdir=/r/d4",
                     "--config.checkpoint.every=5000", "--config.model.llm.depth=4"]
