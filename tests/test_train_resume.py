"""End to end: train.py killed with SIGKILL mid-run resumes to the same parameters, bitwise.

Three runs of the real entry point on the built-in data (tiny sizes): one
uninterrupted; one killed with SIGKILL once a mid-run checkpoint exists (an
asynchronous save may be half-written at that moment) and restarted on the
same workdir. Float32 on CPU is deterministic, so the final parameters must be
bitwise equal.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS1, STEPS2 = 4, 30


def _cmd(workdir, data_dir):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.data.builtin_sizes.captions=64", "--config.data.builtin_sizes.instruct=96",
          "--config.data.builtin_sizes.eval=24",
          f"--config.stage1.steps={STEPS1}", f"--config.stage2.steps={STEPS2}",
          "--config.stage1.data.batch_size=8", "--config.stage2.data.batch_size=8",
          "--config.checkpoint.every=3", "--config.checkpoint.keep=2", "--config.log_every=5",
          "--config.eval.ms=(9,)", "--config.eval.data.batch_size=8"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT
  return env


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "stage2", "checkpoints"))
  step = manager.latest_step()
  assert step == STEPS2
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]["params"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def test_sigkill_and_resume_is_bitwise_exact(tmp_path, data_dir):
  full = subprocess.run(_cmd(tmp_path / "full", data_dir), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  assert "held-out teacher-forced answer accuracy" in full.stdout

  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(killed_dir, data_dir), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ckpt_dir = killed_dir / "stage2" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline:
    if ckpt_dir.exists() and any(p.name.isdigit() and int(p.name) >= 9 for p in ckpt_dir.iterdir()):
      break
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = subprocess.run(_cmd(killed_dir, data_dir), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[stage2] resumed from checkpoint at step" in resumed.stdout

  a, b = _final_params(tmp_path / "full"), _final_params(killed_dir)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
