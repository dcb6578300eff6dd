"""Resuming, piece by piece: the checkpoint folder's fallbacks and errors, and the run
record a checkpoint carries (in-process, small trees; the end-to-end kills, corrupt
checkpoints and write failures of train.py are in tests/test_faults.py)."""
import os

import jax
import numpy as np
import pytest

from data import records
from mqt import checkpoint as ckpt_lib
from mqt import metrics as metrics_lib


def _tree(k: float):
  return {"params": {"w": np.full((64, 64), k, np.float32), "b": np.arange(8, dtype=np.float32)},
          "step": np.int32(k)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                     sharding=jax.sharding.SingleDeviceSharding(
                                                         jax.devices()[0])), _tree(0))


def _saver(path, name="stage1"):
  return ckpt_lib.Checkpointer(str(path), every=1, keep=5, use_async=False, name=name)


def _truncate_largest(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_unreadable_checkpoints_are_moved_aside_and_their_step_saved_again(tmp_path):
  saver = _saver(tmp_path)
  for step in (1, 2, 3):
    saver.save(step, _tree(step), {"offset": 0}, run_state={"losses": [float(step)]})
  saver.close()
  _truncate_largest(tmp_path / "3")
  _truncate_largest(tmp_path / "2")
  lines = []
  saver = _saver(tmp_path)
  step, items = saver.restore_latest(_abstract(), say=lines.append)
  assert step == 1 and items["run"] == {"losses": [1.0]} and items["data"] == {"offset": 0}
  np.testing.assert_array_equal(items["state"]["params"]["w"], _tree(1)["params"]["w"])
  assert len(lines) == 2, lines
  for line, bad, nxt in zip(lines, (3, 2), (2, 1)):
    path = os.path.join(str(tmp_path), str(bad))
    assert line.startswith(f"{path}: cannot be restored (")
    assert line.endswith(f"); moved aside to {path}.corrupt-1, trying step {nxt}")
  assert saver.manager.all_steps() == [1]
  saver.save(2, _tree(2), None, force=True)  # The moved step is written again.
  saver.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.corrupt-1", "3.corrupt-1"]
  saver = _saver(tmp_path)
  assert saver.restore_latest(_abstract(), say=lines.append)[0] == 2
  saver.close()


def test_a_folder_where_nothing_restores_is_one_error_and_nothing_moves(tmp_path):
  saver = _saver(tmp_path)
  saver.save(1, _tree(1), None)
  saver.close()
  _truncate_largest(tmp_path / "1")
  saver = _saver(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as err:
    saver.restore_latest(_abstract(), say=print)
  saver.close()
  msg = str(err.value)
  assert msg.startswith(f"no checkpoint in {tmp_path} can be restored (step 1: ") and "\n" not in msg
  assert os.listdir(tmp_path) == ["1"]
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match=f"^{tmp_path}/1: cannot be restored"):
    _saver(tmp_path).restore(1, _abstract())


def test_a_checkpoint_without_run_record_restores_without_it(tmp_path):
  saver = _saver(tmp_path)
  saver.save(4, _tree(4), {"next_index": 4})  # As checkpoints before the run record.
  saver.close()
  step, items = _saver(tmp_path).restore_latest(_abstract())
  assert step == 4 and set(items) == {"state", "data"}
  assert _saver(tmp_path / "empty").restore_latest(_abstract()) is None


def test_a_failed_write_is_one_line_naming_step_folder_reason_and_last_good(tmp_path,
                                                                            monkeypatch):
  saver = _saver(tmp_path)
  saver.save(1, _tree(1), None)

  def full(*args, **kwargs):
    raise ValueError("writing the array failed") from ValueError(
        "OUT_OF_RANGE: Failed to write 9 bytes: [os_error_code='28']")
  monkeypatch.setattr(saver.manager, "save", full)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as err:
    saver.save(2, _tree(2), None)
  assert str(err.value) == (f"[stage1] cannot write the checkpoint of step 2 in {tmp_path}: "
                            f"No space left on device; the last good checkpoint is step 1 "
                            f"({tmp_path}/1)")
  monkeypatch.setattr(saver.manager, "save", lambda *a, **k: 1 / 0)
  with pytest.raises(ZeroDivisionError):  # Not an I/O error: passed on as it is.
    saver.save(3, _tree(3), None)
  saver.close()
  assert ckpt_lib.os_error_reason(OSError(27, "File too large")) == "File too large"


def test_the_run_record_carries_losses_counters_and_ledger_across_a_resume():
  class Source:
    total = 10
    problems = [records.make_problem("a.json", 3, "x", "missing_image", "no file")]
  lines = []
  record = metrics_lib.StageRecord.start(Source(), log=lines.append)
  assert lines == ["skipping records: missing_image (first: a.json: record 3 (id 'x'): "
                   "missing_image: no file)"]
  losses = [float(x) for x in np.linspace(3, 1, 27)]
  for loss in losses[:13]:
    record.add_loss(loss)
  batch = {"skipped": np.array([True, False]), "truncated": np.array([False, True]),
           "skip_reason": np.array(["overlong", ""], object),
           "skip_message": np.array(["a.json: record 5 (id 'y'): overlong: long", ""], object),
           "record": np.empty(2, object)}
  batch["record"][:] = [(5, "y"), (6, "z")]
  record.add_batch(batch)
  record.add_batch(batch)  # Met again (a later epoch): the record counts once.
  resumed = metrics_lib.StageRecord.from_state(record.state(), Source(), log=lines.append)
  for loss in losses[13:]:
    resumed.add_loss(loss)
  assert len(lines) == 2  # One line per reason, not again after the resume.
  summary = resumed.summary(27)
  assert summary["final_loss"] == float(np.mean(losses[-20:]))
  assert summary["data"] == {"total": 10, "used": 8, "skipped": {"missing_image": 1,
                                                                  "overlong": 1},
                             "skipped_total": 2, "truncated_rows": 2}
  assert resumed.skipped == 2


def test_summaries_compare_without_their_timings():
  a = {"wall_time_s": 3.0, "stages": {"stage1": {"final_loss": 1.0, "time": 2}}, "x": [1]}
  b = {"wall_time_s": 9.0, "stages": {"stage1": {"final_loss": 1.0, "time": 5}}, "x": [1]}
  assert metrics_lib.without_timings(a) == metrics_lib.without_timings(b)
  assert metrics_lib.without_timings(a) == {"stages": {"stage1": {"final_loss": 1.0}}, "x": [1]}
