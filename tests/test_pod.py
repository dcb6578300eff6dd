"""Pod-shaped runs of train.py on the built-in data at tiny sizes, on CPU devices.

Reference: one process with 4 devices (mesh data=4) trains one epoch of each stage.

Several processes: the same command as 2 local processes x 2 devices, joined through
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (cross-process
collectives: gloo). Against the reference:
- the final train state agrees to 1e-5 but for elements of the key-side biases (a key
  projection's bias and the layer norm before it shift every key of a query alike,
  which softmax ignores: their gradient is float noise, which Adam turns into steps of
  +-lr whose sign follows the reduction order, split differently across processes),
  and at most one element of any other parameter, within 1e-4 (where the gradient is
  small, Adam's normalisation scales reduction-order noise up);
- the same evaluation and summary.json (timings aside); one workdir written once
  (process 0 alone reports and writes summary.json);
- from the processes' own iterators (tests/batch_log.py): each sample of a stage read
  exactly once per epoch across the two processes, each process half of every batch.

Another mesh on resume: the reference's workdir as a run stopped after stage 2's
step-10 checkpoint leaves it continues on 1 device and on 8 devices (data=2 x
fsdp=4); each ends where the same command from scratch on those devices ends (the
frozen parts bitwise, the trained LLM to 1e-5 but for rare float-noise elements, see
`_assert_continued`). evaluate.py and predict.py read the 8-device checkpoint on 1
device.

The subprocesses share the persistent JAX compilation cache tests/conftest.py sets.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from mqt import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, STEPS1, STEPS2 = 8, 4, 16  # One epoch of each stage at the sizes below.
EVERY, STOP = 5, 10  # Stage 2 checkpoints at 5, 10, 15 and 16; a stop after 10.
LR = 1e-3  # configs/tiny.py, both stages (checked below).
MESH_2X4 = ("--config.sharding.mesh.data=2", "--config.sharding.mesh.fsdp=4")
TIMEOUT = 300
KEY_BIASES = ("k_proj/bias", "ln_k/bias")

def _overrides(data_dir, eval_ms="(1,9)"):
  """The --config overrides every command here shares (train.py, evaluate.py, predict.py)."""
  return [f"--config.data.data_dir={data_dir}",
          "--config.data.builtin_sizes.captions=32", "--config.data.builtin_sizes.instruct=48",
          "--config.data.builtin_sizes.eval=16",
          f"--config.stage1.steps={STEPS1}", f"--config.stage2.steps={STEPS2}",
          f"--config.stage1.data.batch_size={BATCH}", f"--config.stage2.data.batch_size={BATCH}",
          f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=4",
          "--config.log_every=4", f"--config.eval.ms={eval_ms}",
          "--config.eval.data.batch_size=8"]


def _env(devices, **extra):
  env = dict(os.environ)  # Keeps the compilation cache variables of tests/conftest.py.
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(script, args, processes, devices, log=None):
  """-> [(exit status, output)] of `script` in `processes` processes of `devices` CPU
  devices each; train.py goes through tests/batch_log.py when `log` is given."""
  port = _free_port()
  if log is not None:
    script = os.path.join("tests", "batch_log.py")
  procs = []
  for i in range(processes):
    extra = {"MQT_BATCH_LOG": str(log)} if log is not None else {}
    if processes > 1:
      extra.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), "--config=configs/tiny.py", *args],
        cwd=ROOT, env=_env(devices, **extra), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  t0, results = time.time(), []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT)
      results.append((p.returncode, out))
  finally:
    for p in procs:
      p.kill()
  print(f"{script}: {processes} process(es) x {devices} device(s): {time.time() - t0:.1f} s")
  return results


class Runs:
  """train.py runs with the module's data folder."""

  def __init__(self, data_dir):
    self.data_dir = data_dir

  def train(self, workdir, devices, *extra, processes=1, log=None, eval_ms="(1,9)"):
    """-> the outputs of a train.py run whose processes must all exit 0."""
    results = _launch("train.py", [f"--workdir={workdir}", *_overrides(self.data_dir, eval_ms),
                                   *extra], processes, devices, log)
    for code, out in results:
      assert code == 0, out[-3000:]
    assert "summary written to" in results[0][1], results[0][1][-3000:]
    return [out for _, out in results]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
  """(workdir, batch log) of the 1-process, 4-device run."""
  base = tmp_path_factory.mktemp("four")
  out = runs.train(base / "run", 4, log=base / "batches")[0]
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 cpu device(s), 1 process(es)" in out
  return base / "run", base / "batches"


@pytest.fixture(scope="module")
def two_processes(runs, tmp_path_factory):
  """(workdir, outputs, batch log) of the 2-process x 2-device run."""
  base = tmp_path_factory.mktemp("two")
  outputs = runs.train(base / "run", 2, processes=2, log=base / "batches")
  return base / "run", outputs, base / "batches"


# ---------------------------------------------------------------------------
# What a run leaves behind.

def _ckpt_dir(workdir, stage):
  return os.path.join(workdir, f"stage{stage}", "checkpoints")


def _steps(workdir, stage):
  return sorted(int(n) for n in os.listdir(_ckpt_dir(workdir, stage)) if n.isdigit())


def _state(workdir, stage, step):
  """A checkpoint's train state as host arrays, whatever devices wrote it."""
  path = os.path.join(_ckpt_dir(workdir, stage), str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return checkpointer.restore(path, restore_args=args)


def _named(tree, prefix=""):
  """{"params/llm/...": array} of the leaves whose path starts with `prefix`."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  named = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
           for path, x in flat}
  return {k: v for k, v in named.items() if k.startswith(prefix)}


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return metrics_lib.without_timings(json.load(f))


def _batches(log, process):
  with open(f"{log}.{process}.jsonl") as f:
    return [json.loads(line) for line in f]


def test_the_learning_rate_the_tolerances_assume():
  sys.path.insert(0, ROOT)
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  assert config.stage1.optim.lr == config.stage2.optim.lr == LR


# ---------------------------------------------------------------------------
# Two processes.

@pytest.mark.parametrize("stage,step", [(1, STEPS1), (2, STEPS2)])
def test_two_processes_train_as_one(reference, two_processes, stage, step):
  want = _named(_state(reference[0], stage, step))
  got = _named(_state(two_processes[0], stage, step))
  assert got.keys() == want.keys() and len(got) > 100
  assert int(got["step"]) == int(want["step"]) == step
  elsewhere, noise = [], 0
  for name, x in want.items():
    y = got[name]
    assert y.shape == x.shape and y.dtype == x.dtype, name
    far = np.abs(y.astype(np.float64) - x) > 1e-5 + 1e-5 * np.abs(x)
    if not far.any():
      continue
    if name.startswith("params/") and name.endswith(KEY_BIASES):
      # Their gradient is float noise (a softmax ignores a shift shared by every key):
      # held to what Adam can move them in both stages (up to lr per step), not counted.
      np.testing.assert_allclose(y, x, atol=2 * LR * (STEPS1 + STEPS2), err_msg=name)
    elif name.startswith("params/") and far.sum() == 1 and np.abs(y - x).max() < 1e-4:
      noise += 1  # A lone element a little past 1e-5 (Adam scales up a small gradient).
    else:
      elsewhere.append((name, int(far.sum()), float(np.abs(y - x).max())))
  assert not elsewhere, elsewhere
  assert noise <= sum(v.size for v in want.values()) // 10_000, noise


def test_one_workdir_written_once(reference, two_processes):
  workdir, outputs, _ = two_processes
  assert "process 0 of 2 (2 local device(s) of 4)" in outputs[0], outputs[0][-2000:]
  assert "process 1 of 2 (2 local device(s) of 4)" in outputs[1], outputs[1][-2000:]
  assert ("mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 cpu device(s), 2 process(es)"
          in outputs[0])
  for line in ("summary written to", "held-out teacher-forced answer accuracy",
               f"[stage2] step {STEPS2}/{STEPS2}"):
    assert [line in out for out in outputs] == [True, False], line  # Process 0 reports.
  for stage, steps in ((1, {STEPS1}), (2, {5, 10, 15, STEPS2})):
    names = os.listdir(_ckpt_dir(workdir, stage))
    assert all(n.isdigit() for n in names), names  # No temporary or per-process copies.
    assert {int(n) for n in names} == steps, names
  one, two = _summary(reference[0]), _summary(workdir)
  assert two["stages"]["stage2"]["data"] == one["stages"]["stage2"]["data"]
  assert two["eval"]["accuracy"] == one["eval"]["accuracy"]
  assert two["eval"]["count"] == one["eval"]["count"]
  assert sum(two["eval"]["count"].values()) == 16
  np.testing.assert_allclose(two["stages"]["stage2"]["final_loss"],
                             one["stages"]["stage2"]["final_loss"], rtol=1e-5)


def test_each_sample_once_per_epoch_across_processes(reference, two_processes):
  parts = [_batches(two_processes[2], p) for p in (0, 1)]
  whole = _batches(reference[1], 0)
  for stage, steps in (("stage1", STEPS1), ("stage2", STEPS2)):
    rows = [[b for b in part if b["stage"] == stage] for part in parts]
    assert [len(r) for r in rows] == [steps, steps]
    assert rows[0][0]["epoch_steps"] == steps  # The run is exactly one epoch.
    seen = []
    for a, b in zip(*rows):
      assert a["step"] == b["step"]
      assert not set(a["ids"]) & set(b["ids"]), (stage, a["step"])  # Each its own rows.
      assert len(a["ids"]) <= BATCH // 2 and len(b["ids"]) <= BATCH // 2
      seen += a["ids"] + b["ids"]
    assert len(seen) == len(set(seen)) == rows[0][0]["records"], stage
    # Together they read what one process reads, batch by batch.
    single = [b for b in whole if b["stage"] == stage]
    assert ([sorted(a["ids"] + b["ids"]) for a, b in zip(*rows)]
            == [sorted(b["ids"]) for b in single])


# ---------------------------------------------------------------------------
# Another mesh on resume.

@pytest.fixture(scope="module")
def stopped(reference, tmp_path_factory):
  """The reference workdir as a run stopped after stage 2's step-10 checkpoint leaves
  it (the later checkpoints and summary.json removed)."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  shutil.copytree(reference[0], workdir)
  assert _steps(workdir, 2) == [5, STOP, 15, STEPS2]
  for step in (15, STEPS2):
    shutil.rmtree(os.path.join(_ckpt_dir(workdir, 2), str(step)))
  os.remove(workdir / "summary.json")
  return workdir


def _continue(runs, stopped, tmp_path_factory, devices, *extra):
  """-> (the continued copy of `stopped`, a from-scratch run's workdir), both on
  `devices` devices with `extra` flags (and no end-of-run evaluation)."""
  base = tmp_path_factory.mktemp(f"on{devices}")
  resumed = base / "resumed"
  shutil.copytree(stopped, resumed)
  out = runs.train(resumed, devices, *extra, eval_ms="()")[0]
  assert f"[stage2] resumed from checkpoint at step {STOP}" in out, out[-3000:]
  assert f"[stage1] resumed from checkpoint at step {STEPS1}" in out, out[-3000:]
  assert "data position was taken from the step" not in out, out[-3000:]
  assert _steps(resumed, 2)[-1] == STEPS2
  scratch = base / "scratch"
  out = runs.train(scratch, devices, *extra, eval_ms="()")[0]
  assert "resumed from checkpoint" not in out
  return resumed, scratch


@pytest.fixture(scope="module")
def on_one(runs, stopped, tmp_path_factory):
  return _continue(runs, stopped, tmp_path_factory, 1)


@pytest.fixture(scope="module")
def on_eight(runs, stopped, tmp_path_factory):
  return _continue(runs, stopped, tmp_path_factory, 8, *MESH_2X4)


def _assert_continued(resumed, scratch, stopped, what):
  """The continued run's final stage-2 state against the stopped run's and a from-scratch
  run's on the same devices.

  The part stage 2 keeps frozen (vision/) is the stopped run's, bitwise: it was trained
  by the 4-device stage 1 and only restored since. What stage 2 trains (query/, llm/)
  agrees with the from-scratch run's to 1e-5 but for at most 1 element in 10,000, and
  all to 1e-4, a fifth or less of what the steps after the stop moved it. (Elements whose
  gradient is float noise take Adam steps of +-lr whose sign depends on the reduction
  order, which differs between meshes. The query transformer's key biases are all such
  elements, since a softmax ignores a shift shared by every key: they are held to what
  Adam can move them, 2 lr per step.)"""
  got, want = _state(resumed, 2, STEPS2), _state(scratch, 2, STEPS2)
  before = _state(stopped, 2, STOP)
  assert int(got["step"]) == int(want["step"]) == STEPS2, what
  frozen, frozen_before = _named(got, "params/vision/"), _named(before, "params/vision/")
  assert frozen.keys() == frozen_before.keys() and len(frozen) > 10, what
  for name, x in frozen.items():
    np.testing.assert_array_equal(x, frozen_before[name], err_msg=f"{what}: {name}")
  trained = _named(got, "params/llm/") | _named(got, "params/query/")
  trained_want = _named(want, "params/llm/") | _named(want, "params/query/")
  trained_before = _named(before, "params/llm/") | _named(before, "params/query/")
  assert trained.keys() == trained_want.keys() and len(trained) > 20, what
  moved = max(float(np.abs(x - trained_before[k]).max()) for k, x in trained.items())
  assert moved > 5e-4, (what, moved)  # 5x the tolerance below.
  off = total = 0
  for name, x in trained.items():
    if name.endswith(KEY_BIASES):
      np.testing.assert_allclose(x, trained_want[name], atol=2 * LR * STEPS2,
                                 err_msg=f"{what}: {name}")
      continue
    np.testing.assert_allclose(x, trained_want[name], atol=1e-4, rtol=1e-4,
                               err_msg=f"{what}: {name}")
    off += int((np.abs(x - trained_want[name]) > 1e-5 + 1e-5 * np.abs(trained_want[name])).sum())
    total += x.size
  assert off <= total // 10_000, (what, off, total)


def test_a_4_device_checkpoint_continues_on_1_device(on_one, stopped):
  resumed, scratch = on_one
  _assert_continued(resumed, scratch, stopped, "4 devices -> 1 device")


def test_a_4_device_checkpoint_continues_on_a_2x4_mesh(on_eight, stopped):
  resumed, scratch = on_eight
  _assert_continued(resumed, scratch, stopped, "4 devices -> data=2 x fsdp=4")
  summary = _summary(resumed)
  assert summary["stages"]["stage2"]["steps"] == STEPS2 and "eval" not in summary


def test_an_8_device_checkpoint_evaluates_on_1_device(runs, on_eight, tmp_path):
  resumed, _ = on_eight
  out_dir = tmp_path / "eval"
  [(code, out)] = _launch("evaluate.py", [f"--workdir={resumed}", *_overrides(runs.data_dir),
                                          "--ms=1,9", "--limit=8", f"--out_dir={out_dir}"], 1, 1)
  assert code == 0, out[-3000:]
  with open(out_dir / "results.json") as f:
    results = json.load(f)
  assert results, results


def test_an_8_device_checkpoint_predicts_on_1_device(runs, on_eight, tmp_path):
  resumed, _ = on_eight
  image = tmp_path / "img.png"
  pixels = np.zeros((72, 72, 3), np.uint8)
  pixels[24:48, 24:48] = (220, 30, 30)
  Image.fromarray(pixels).save(image)
  [(code, out)] = _launch("predict.py", [f"--workdir={resumed}", *_overrides(runs.data_dir),
                                         f"--image={image}", "--prompt=What color is the square?",
                                         "--m=4", "--max_new_tokens=3"], 1, 1)
  assert code == 0, out[-3000:]
