"""Runs train.py and writes, per process, the sample ids of every batch its data
iterators yield: one JSON line per batch to `$MQT_BATCH_LOG.<process index>.jsonl`
({"stage", "step", "ids", "epoch_steps", "records"}; empty rows left out).

Used by tests/test_multiprocess.py to check, from the processes' own iterators, that
each sample of a stage is read exactly once per epoch across the processes.
"""
import json
import os
import runpy
import sys

import jax

from mqt import run_inputs


class _Logged:
  """Wraps a batch iterator; appends each batch's ids to the log."""

  def __init__(self, it, path, stage, step, epoch_steps, records):
    self.it, self.path, self.stage, self.step = it, path, stage, step
    self.head = {"epoch_steps": epoch_steps, "records": records}

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    ids = [str(i) for i, empty in zip(batch["sample_id"], batch["empty"]) if not empty]
    with open(self.path, "a") as f:
      f.write(json.dumps({"stage": self.stage, "step": self.step, "ids": ids, **self.head})
              + "\n")
    self.step += 1
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def steps_per_epoch(source, cfg) -> int:
  """Batches in one epoch of `source` under the pipeline config `cfg`."""
  from data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.BatchPlan(source.has_image, cfg).batches_per_epoch


def _patch():
  original = run_inputs.data_iterator

  def data_iterator(source, pcfg, name, step, data_state):
    it, offset = original(source, pcfg, name, step, data_state)
    path = f"{os.environ['MQT_BATCH_LOG']}.{jax.process_index()}.jsonl"
    return _Logged(it, path, name, step, steps_per_epoch(source, pcfg),
                   len(source)), offset

  run_inputs.data_iterator = data_iterator


if __name__ == "__main__":
  _patch()
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
  sys.argv = [script] + sys.argv[1:]
  runpy.run_path(script, run_name="__main__")
