"""Fault injection on the real entry point: train.py on the built-in data at tiny sizes.

One uninterrupted run is the reference (`baseline`, once per module). Against it:
SIGKILL at seeded random moments (one while an asynchronous save is in flight)
and reruns until the run ends; a truncated latest checkpoint; a learning rate
that overflows float32; a file-size limit that makes a checkpoint write fail;
a resume with another data.worker_count; SIGTERM (a preempted VM). Float32 on
CPU is deterministic, so arrays must be bitwise equal and summary.json equal less
its timings.

The subprocesses share a persistent JAX compilation cache (under the session's
basetemp), so each compiles the tiny steps once.
"""
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mqt import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS1, STEPS2, EVERY = 2, 12, 3  # The SIGTERM test expects STEPS2 = 12.
TIMEOUT = 300


def _cmd(workdir, data_dir, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.data.builtin_sizes.captions=32", "--config.data.builtin_sizes.instruct=48",
          "--config.data.builtin_sizes.eval=16",
          f"--config.stage1.steps={STEPS1}", f"--config.stage2.steps={STEPS2}",
          "--config.stage1.data.batch_size=8", "--config.stage2.data.batch_size=8",
          f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=2",
          "--config.log_every=4", "--config.eval.ms=(9,)", "--config.eval.data.batch_size=8",
          # Two step shapes in stage 2 (m <= 4 and m <= 9): resuming picks each step's.
          "--config.stage2.matryoshka.buckets=(4,)",
          *extra]


def _env(cache_dir):
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


class Runner:
  """Runs train.py with the module's data and compilation cache."""

  def __init__(self, data_dir, cache_dir):
    self.data_dir, self.env = data_dir, _env(cache_dir)

  def run(self, workdir, *extra):
    t0 = time.time()
    proc = subprocess.run(_cmd(workdir, self.data_dir, *extra), cwd=ROOT, env=self.env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    print(f"train.py {' '.join(extra)}: {time.time() - t0:.1f} s, exit {proc.returncode}")
    return proc, proc.stdout + proc.stderr

  def start(self, workdir, *extra):
    return subprocess.Popen(_cmd(workdir, self.data_dir, *extra), cwd=ROOT, env=self.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  return Runner(str(tmp_path_factory.mktemp("data")), base / "jax_cache")


@pytest.fixture(scope="module")
def baseline(runner, tmp_path_factory):
  """The uninterrupted run's workdir."""
  workdir = tmp_path_factory.mktemp("baseline") / "run"
  proc, out = runner.run(workdir)
  assert proc.returncode == 0, out[-3000:]
  assert "held-out teacher-forced answer accuracy" in out
  assert "[stage2] compiling the step for m <= 4 (4 visual slots)" in out, out[-3000:]
  return workdir


# ---------------------------------------------------------------------------
# What a run leaves behind.

def _ckpt_dir(workdir, stage):
  return os.path.join(workdir, f"stage{stage}", "checkpoints")


def _steps(workdir, stage):
  folder = _ckpt_dir(workdir, stage)
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _restore(folder, step):
  """-> {"state": ..., "data": ..., "run": ...} of a checkpoint (host arrays)."""
  manager = ocp.CheckpointManager(folder)
  items = {"state": ocp.args.StandardRestore()}
  items.update({k: ocp.args.JsonRestore() for k in ("data", "run")
                if os.path.isdir(os.path.join(folder, str(step), k))})
  out = manager.restore(step, args=ocp.args.Composite(**items))
  manager.close()
  return {k: out[k] for k in items}


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return metrics_lib.without_timings(json.load(f))


def _assert_same_arrays(a, b, what):
  (la, ta), (lb, tb) = jax.tree.flatten(a), jax.tree.flatten(b)
  assert ta == tb, what
  assert len(la) > 10, what
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def _assert_same_final(workdir, reference, data_state=True):
  """Both stages' final checkpoints (state; the data position and run record when
  `data_state`) and summary.json (less timings) equal the reference run's."""
  for stage, total in ((1, STEPS1), (2, STEPS2)):
    assert _steps(workdir, stage)[-1] == total
    got = _restore(_ckpt_dir(workdir, stage), total)
    want = _restore(_ckpt_dir(reference, stage), total)
    _assert_same_arrays(got["state"], want["state"], f"stage{stage} state")
    assert got["run"] == want["run"], f"stage{stage} run record"
    if data_state:
      assert got["data"] == want["data"], f"stage{stage} data position"
  assert _summary(workdir) == _summary(reference)


def _copy(baseline, tmp_path, drop_stage2_after=None):
  """A copy of the baseline's workdir, less its stage-2 checkpoints after a step."""
  workdir = tmp_path / "run"
  shutil.copytree(baseline, workdir)
  for step in _steps(workdir, 2):
    if drop_stage2_after is not None and step > drop_stage2_after:
      shutil.rmtree(os.path.join(_ckpt_dir(workdir, 2), str(step)))
  os.remove(workdir / "summary.json")
  return workdir


def _wait_for(pred, proc, deadline_s=TIMEOUT, poll_s=0.02):
  """Polls `pred` until true (-> True) or the process ends (-> False)."""
  deadline = time.time() + deadline_s
  while time.time() < deadline:
    if pred():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll_s)
  raise AssertionError("timed out")


def _saving(workdir):
  """An orbax temporary folder (a save in flight) in a stage's checkpoints folder."""
  return any("orbax-checkpoint-tmp" in n for stage in (1, 2)
             for n in (os.listdir(_ckpt_dir(workdir, stage))
                       if os.path.isdir(_ckpt_dir(workdir, stage)) else ()))


# ---------------------------------------------------------------------------

def test_sigkill_at_random_moments_then_rerun_is_exact(runner, baseline, tmp_path):
  """Killed while a save is in flight, then at seeded random delays after a checkpoint
  newer than the run's start appears (one before the run's last, so that steps remain:
  a tiny step takes ~0.1 s, hence delays under 0.3 s), until killed three times or the
  run ends; then rerun until it ends."""
  workdir, rng = tmp_path / "run", random.Random(1234)
  kills = 0
  for attempt in range(5):
    before = {s: set(_steps(workdir, s)) for s in (1, 2)}
    proc = runner.start(workdir)
    if attempt == 0:
      hit = _wait_for(lambda: _saving(workdir) and _steps(workdir, 1), proc, poll_s=0.005)
    else:
      fresh = lambda: (set(_steps(workdir, 1)) - before[1]) | {
          s for s in set(_steps(workdir, 2)) - before[2] if s < STEPS2}
      hit = _wait_for(fresh, proc, poll_s=0.005)
      time.sleep(rng.uniform(0.0, 0.3))
    if hit and proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.communicate()
    if proc.returncode == 0:
      break
    assert proc.returncode == -signal.SIGKILL
    if kills == 3:
      break
  assert kills >= 2
  proc, out = runner.run(workdir)
  assert proc.returncode == 0, out[-3000:]
  assert "resumed from checkpoint at step" in out
  _assert_same_final(workdir, baseline)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(runner, baseline, tmp_path):
  workdir = _copy(baseline, tmp_path)
  steps = _steps(workdir, 2)
  assert steps == [STEPS2 - EVERY, STEPS2]
  latest = os.path.join(_ckpt_dir(workdir, 2), str(STEPS2))
  files = [os.path.join(r, f) for r, _, fs in os.walk(latest) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  proc, out = runner.run(workdir)
  assert proc.returncode == 0, out[-3000:]
  line = [x for x in out.splitlines() if "cannot be restored" in x]
  assert len(line) == 1, out[-3000:]
  assert line[0].startswith(f"{latest}: cannot be restored (")
  assert line[0].endswith(f"); moved aside to {latest}.corrupt-1, trying step {steps[0]}")
  assert f"[stage2] resumed from checkpoint at step {steps[0]}" in out
  assert os.path.isdir(f"{latest}.corrupt-1")
  _assert_same_final(workdir, baseline)


def test_learning_rate_overflowing_float32_stops_without_saving_it(runner, baseline, tmp_path):
  """Stage 2 resumed at step 9 with lr = 1e39 (inf in float32) and a checkpoint every
  step: the first update is refused, nothing non-finite reaches the disk."""
  good = STEPS2 - EVERY
  workdir = _copy(baseline, tmp_path, drop_stage2_after=good)
  proc, out = runner.run(workdir, "--config.stage2.optim.lr=1e39", "--config.checkpoint.every=1")
  assert proc.returncode != 0
  assert re.search(rf"\[stage2\] loss \S+, gradient norm \S+ at step {good + 1} \(m=\[\d+\]\): "
                   rf"non-finite parameters; stopping without adopting or "
                   rf"saving this update\. The last good checkpoint \(step {good}\) in "
                   rf"{re.escape(_ckpt_dir(workdir, 2))} is kept\. "
                   rf"--config\.stage2\.optim\.lr=1e\+39 is not finite in float32", out), out[-3000:]
  assert _steps(workdir, 2) == [good]
  for stage in (1, 2):
    for step in _steps(workdir, stage):
      state = _restore(_ckpt_dir(workdir, stage), step)["state"]
      for leaf in jax.tree.leaves(state):
        assert np.isfinite(np.asarray(leaf, np.float64)).all(), (stage, step)


def _largest_files(workdir, sub):
  sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(workdir / sub) for f in fs]
  return max(sizes)


def test_a_write_failure_stops_with_one_line_and_a_loadable_checkpoint(
    runner, baseline, tmp_path):
  """A file-size limit set on the running process (writes past it fail with EFBIG) once
  stage 2's first checkpoint is complete: above the TensorBoard event files, below
  the checkpoints' data files."""
  limit = 1 << 20
  assert _largest_files(baseline, "stage2/tensorboard") < limit
  assert _largest_files(baseline, "stage2/checkpoints") > limit
  workdir = tmp_path / "run"
  proc = runner.start(workdir)
  assert _wait_for(lambda: _steps(workdir, 2), proc, poll_s=0.005), "the run ended first"
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
  out, _ = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode not in (0, None), out[-3000:]
  assert "Traceback" not in out, out[-5000:]
  lines = [x for x in out.splitlines() if "cannot write the checkpoint" in x]
  assert len(lines) == 1, out[-3000:]
  match = re.search(r"\[stage2\] cannot write the checkpoint of step (\d+) in (\S+): "
                    r"File too large; the last good checkpoint is step (\d+) \((\S+)\)", lines[0])
  assert match, lines[0]
  failed, folder, good = int(match[1]), match[2], int(match[3])
  assert folder == _ckpt_dir(workdir, 2) and good < failed and good % EVERY == 0
  errors = [x for x in out.splitlines() if re.match(r"(error|E\d{4} |ERROR)", x)]
  assert len(errors) <= 1, errors
  state = _restore(folder, good)["state"]
  assert int(state["step"]) == good
  assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(state))


def test_resume_with_another_worker_count_is_exact(runner, baseline, tmp_path):
  """The state of a run killed after its step-9 checkpoint (the baseline's, less the
  last checkpoint), rerun with data.worker_count=1 instead of 0: the position is
  taken from the step and the final parameters are bitwise the baseline's."""
  good = STEPS2 - EVERY
  workdir = _copy(baseline, tmp_path, drop_stage2_after=good)
  proc, out = runner.run(workdir, "--config.data.worker_count=1")
  assert proc.returncode == 0, out[-3000:]
  assert (f"[stage2] the data position was taken from the step ({good}): the checkpoint was "
          f"written with data.worker_count=0, this run has 1") in out
  _assert_same_final(workdir, baseline, data_state=False)


def test_sigterm_checkpoints_the_step_and_the_rerun_is_exact(runner, baseline, tmp_path):
  """SIGTERM once stage 2 has a checkpoint (a preempted VM): the step in progress ends,
  its checkpoint is written, the run exits with status 75 and one line within seconds,
  and the same command continues to the uninterrupted run's final state, bitwise."""
  workdir = tmp_path / "run"
  proc = runner.start(workdir)
  assert _wait_for(lambda: _steps(workdir, 2), proc, poll_s=0.01), "the run ended first"
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=TIMEOUT)
  seconds = time.time() - t0
  assert proc.returncode == 75, out[-3000:]
  assert seconds < 30, seconds  # Well inside a preemption's grace period (30 s on GCE).
  assert "Traceback" not in out, out[-3000:]
  match = re.search(r"stopped: \[stage2\] stopped on SIGTERM at step (\d+)/12; its checkpoint "
                    r"is in (\S+)\. Run the same command again to continue\.", out)
  assert match, out[-3000:]
  step = int(match[1])
  assert match[2] == os.path.join(_ckpt_dir(workdir, 2), str(step))
  assert _steps(workdir, 2)[-1] == step  # The step it stopped at (any, not only every 3rd).
  assert int(_restore(_ckpt_dir(workdir, 2), step)["state"]["step"]) == step
  proc, out = runner.run(workdir)
  assert proc.returncode == 0, out[-3000:]
  assert f"[stage2] resumed from checkpoint at step {step}" in out
  _assert_same_final(workdir, baseline)
