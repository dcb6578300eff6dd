"""Bad invocations of train.py, evaluate.py and predict.py: each ends within seconds, before
any work, with exit status 2 and "error: ..." lines naming every culprit, no traceback.

One tiny training run (a smaller model than configs/tiny.py's: its LLM has one layer and
mlp_dim 64) gives the workdir whose checkpoint the invocations find "of another model
size"; every invocation is a subprocess, run in parallel threads.
"""
import concurrent.futures
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from mqt import train
from mqt import validate
from mqt.model import ModelConfig, abstract_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """(workdir, config) of a one-step stage-1 run of a smaller model."""
  root = tmp_path_factory.mktemp("small")
  config = tiny.get_config()
  config.model.llm.depth, config.model.llm.mlp_dim = 1, 64
  config.data.data_dir = str(root / "data")
  config.data.builtin_sizes.update(dict(captions=16, instruct=16, eval=8))
  config.run_stages = "1"
  config.stage1.steps = 1
  config.stage1.data.batch_size = 8
  config.checkpoint.use_async = False
  config.eval.ms = ()
  train.train_and_evaluate(config, str(root / "w"))
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(root / "img.png")
  (root / "bad.json").write_text('[{"id": "a", "conversations": [')
  return root, config


def test_checkpoint_problems_read_metadata_only(small_run):
  root, config = small_run
  folder = str(root / "w" / "stage1" / "checkpoints")
  small = abstract_params(ModelConfig.from_config(config.model))
  assert validate.checkpoint_problems(folder, small) == []
  assert validate.checkpoint_problems(folder, small["params"]) == []
  big = abstract_params(ModelConfig.from_config(tiny.get_config().model))
  (line,) = validate.checkpoint_problems(folder, big)
  assert line.startswith(f"checkpoint {folder} step 1 holds a different model: "
                         "llm/layers_0/down_proj/kernel has shape (64, 128), the config's "
                         "model (256, 128); "), line
  assert "is missing from the checkpoint" in line and line.count(";") == 5
  assert "; and 7 more (" in line  # 3 shapes + 9 leaves of layers_1 = 12, 5 named.
  bf16 = tiny.get_config()
  bf16.model.llm.depth, bf16.model.llm.mlp_dim = 1, 64
  bf16.model.param_dtype = "bfloat16"
  bf16 = abstract_params(ModelConfig.from_config(bf16.model))
  assert "has dtype float32, the config's model bfloat16" in validate.checkpoint_problems(
      folder, bf16)[0]
  assert validate.checkpoint_problems(folder, bf16, dtypes=False) == []
  assert validate.checkpoint_problems(str(root / "absent"), small) == [
      f"checkpoint folder {root / 'absent'} does not exist"]


def _cases(root):
  """(name, script, args, devices, strings stderr must hold)."""
  data = f"--config.data.data_dir={root / 'data'}"
  tok = str(root / "data" / "mqt_synthetic_tokenizer" / "tokenizer.model")
  work = f"--workdir={root / 'w'}"
  fresh = f"--workdir={root / 'fresh'}"
  ckpt = str(root / "w" / "stage1" / "checkpoints")
  run1 = "--config.run_stages=1"
  pred = [work, data, run1, f"--image={root / 'img.png'}", "--prompt=What color?"]
  return [
      ("unknown key", "train.py", [fresh, "--config.stage1.stepz=3"], 1,
       ["--config.stage1.stepz", "unknown config key 'stage1.stepz'", "did you mean stage1.steps"]),
      ("nested key", "train.py", [fresh, "--config.model.llm.widht=64"], 1,
       ["--config.model.llm.widht", "did you mean model.llm.width"]),
      ("bad value", "train.py", [fresh, "--config.stage1.steps=abc"], 1,
       ["--config.stage1.steps=abc: 'abc' is not an integer"]),
      ("eval m", "train.py", [fresh, "--config.eval.ms=(1,2,99)"], 1,
       ["--config.eval.ms=(1, 2, 99): m=99 is out of range: 1 <= m <= M=9"]),
      ("stage m", "train.py", [fresh, "--config.stage2.matryoshka.m=12"], 1,
       ["--config.stage2.matryoshka.m=12", "1 <= m <= M=9"]),
      ("dtype", "train.py", [fresh, "--config.model.param_dtype=float64"], 1,
       ["--config.model.param_dtype=float64", "float32 | bfloat16 | float16"]),
      ("mesh", "train.py", [fresh, "--config.sharding.mesh.data=2",
                            "--config.sharding.mesh.fsdp=8"], 8,
       ["--config.sharding.mesh (data=2, fsdp=8, tensor=1) needs 16 devices", "the 8 there are"]),
      ("missing json", "train.py", [fresh, run1, f"--config.tokenizer_path={tok}",
                                    f"--config.stage1.data.json_path={root / 'absent.json'}",
                                    f"--config.stage1.data.image_folder={root}"], 1,
       [f"--config.stage1.data.json_path={root / 'absent.json'} does not exist"]),
      ("malformed json", "train.py", [fresh, run1, f"--config.tokenizer_path={tok}",
                                      f"--config.stage1.data.json_path={root / 'bad.json'}",
                                      f"--config.stage1.data.image_folder={root}"], 1,
       ["--config.stage1.data.json_path", f"{root / 'bad.json'}: malformed JSON at line 1"]),
      ("knob", "train.py", [fresh, "--config=configs/tiny.py:variant=nope"], 1,
       ["--config.model.query.variant=nope", "official | perceiver"]),
      ("bad knob", "train.py", [fresh, "--config=configs/tiny.py:stag=1"], 1,
       ["--config=configs/tiny.py:stag=1: unknown config knob 'stag'"]),
      ("resume other size", "train.py", [work, data, run1], 1,
       [f"checkpoint {ckpt} step 1 holds a different model"]),
      ("init_from other size", "train.py", [fresh, data, run1,
                                            f"--config.stage1.init_from={ckpt}"], 1,
       [f"checkpoint {ckpt} step 1 holds a different model"]),
      ("several", "train.py", [fresh, "--config.model.dtype=int8", "--config.eval.ms=(0,4)",
                               f"--config.tokenizer_path={root / 'absent.model'}"], 1,
       ["this run cannot start (3 problems)", "--config.model.dtype=int8",
        "--config.eval.ms=(0, 4): m=0", f"--config.tokenizer_path={root / 'absent.model'} "
        "does not exist"]),
      ("ms item", "evaluate.py", [work, data, run1, "--ms=1,x"], 1,
       ["--ms=1,x: 'x' is not an integer"]),
      ("ms range", "evaluate.py", [work, data, run1, "--ms=2,16"], 1,
       ["--ms=2,16: m=16 is out of range: 1 <= m <= M=9"]),
      ("eval other size", "evaluate.py", [work, data, run1], 1,
       [f"checkpoint {ckpt} step 1 holds a different model",
        "llm/layers_0/down_proj/kernel has shape (64, 128), the config's model (256, 128)"]),
      ("benchmark", "evaluate.py", [work, data, run1, "--benchmarks=builtin,popee"], 1,
       ["--benchmarks=builtin,popee: unknown benchmark 'popee'"]),
      ("eval tokenizer", "evaluate.py", [work, data, run1, "--limit=-1",
                                         f"--config.tokenizer_path={root / 'no.model'}"], 1,
       [f"--config.tokenizer_path={root / 'no.model'} does not exist", "--limit=-1"]),
      ("m zero", "predict.py", pred + ["--m=0"], 1, ["--m=0: m=0 is out of range"]),
      ("m above M", "predict.py", pred + ["--m=10"], 1,
       ["--m=10: m=10 is out of range: 1 <= m <= M=9"]),
      ("predict tokenizer", "predict.py", pred + ["--m=2",
                                                  f"--config.tokenizer_path={root / 'no.model'}"],
       1, [f"--config.tokenizer_path={root / 'no.model'} does not exist"]),
      ("predict other size", "predict.py", pred + ["--m=2"], 1,
       [f"checkpoint {ckpt} step 1 holds a different model"]),
      ("process id", "train.py", [fresh], 1,
       ["JAX_PROCESS_ID=2 is not below JAX_NUM_PROCESSES=2 (ids count from 0)"]),
      ("process count", "train.py", [fresh], 1,
       ["JAX_NUM_PROCESSES='two' is not a non-negative integer",
        "JAX_NUM_PROCESSES is set but not JAX_PROCESS_ID: set both"]),
      ("predict several", "predict.py", [work, data, run1, f"--image={root / 'none.png'}",
                                         "--prompt=hi", "--m=0", "--top_p=2"], 1,
       ["this run cannot start", "--m=0", "--top_p=2.0 must lie in (0, 1]",
        f"image {root / 'none.png'} does not exist"]),
  ]


# Launch settings of several processes (mqt/distributed.py), by case name.
ENVIRONMENTS = {
    "process id": {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": "2"},
    "process count": {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "two"},
}


def _run(script, args, devices, environment=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(environment or {}))
  if not any(a.startswith("--config=") for a in args):
    args = ["--config=configs/tiny.py", *args]
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  return proc, time.perf_counter() - t0


def test_bad_invocations_are_named_before_any_work(small_run):
  root, _ = small_run
  cases = _cases(root)
  assert len(cases) >= 14
  before = sorted(os.listdir(root / "w" / "stage1" / "checkpoints"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    runs = list(pool.map(lambda c: _run(c[1], c[2], c[3], ENVIRONMENTS.get(c[0])), cases))
  times = {}
  for (name, script, _, _, wanted), (proc, seconds) in zip(cases, runs):
    where = f"{name} ({script}): rc {proc.returncode}\n{proc.stderr[-3000:]}"
    times[name] = round(seconds, 1)
    assert proc.returncode == 2, where
    assert "Traceback" not in proc.stderr, where
    assert proc.stderr.startswith("error: ") or "\nerror: " in proc.stderr, where
    for text in wanted:
      assert text in proc.stderr, (text, where)
    for work in ("[stage", "per device", "mesh {", "memory of", "evaluating", "preparing"):
      assert work not in proc.stdout + proc.stderr, (work, where)
    assert seconds < 60, where
  assert not (root / "fresh").exists()  # No run started: its workdir was never made.
  assert sorted(os.listdir(root / "w" / "stage1" / "checkpoints")) == before
  assert not (root / "w" / "eval").exists()
  print("seconds per invocation:", times)


def test_debug_shows_the_traceback(small_run):
  root, _ = small_run
  proc, _ = _run("predict.py", [f"--workdir={root / 'w'}", f"--image={root / 'img.png'}",
                                "--prompt=hi", "--m=0", "--debug",
                                f"--config.data.data_dir={root / 'data'}",
                                "--config.run_stages=1"], 1)
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "--m=0: m=0 is out of range" in proc.stderr
