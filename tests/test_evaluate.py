"""The evaluation sweep over m and the predict command, on a briefly trained tiny model."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from configs import tiny
from mqt import checkpoint as ckpt_lib
from mqt import evaluate
from mqt import inference
from mqt import memory as mem_lib
from mqt import train
from mqt.model import MQTLLaVA, ModelConfig, dummy_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.data.builtin_sizes.update(dict(captions=32, instruct=32, eval=24))
  config.run_stages = "1"
  config.stage1.steps = 2
  config.stage1.data.batch_size = 8
  config.checkpoint.use_async = False
  config.eval.ms = ()
  config.eval.generation.batch_size = 8
  config.eval.generation.max_new_tokens = 4
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The built-in data and tokenizer, and a checkpoint where train.py puts one (random
  weights saved the way train.py saves them: compiling a train step would add a minute)."""
  root = tmp_path_factory.mktemp("evaluate")
  config = _config(root / "data")
  workdir = str(root / "run")
  train.open_source(config, config.stage1.data, workdir)  # Prepares data + tokenizer.
  model_cfg = ModelConfig.from_config(config.model)
  params = nn.unbox(MQTLLaVA(model_cfg).init(jax.random.key(0), *dummy_inputs(model_cfg),
                                             16))["params"]
  saver = ckpt_lib.Checkpointer(inference.default_checkpoint(config, workdir), every=1, keep=1,
                                use_async=False)
  saver.save(1, {"params": params, "step": 1}, None, force=True)
  saver.close()
  return config, workdir


def test_sweep_writes_table_plots_and_compiles_once_per_m(trained, capsys):
  config, workdir = trained
  out = os.path.join(workdir, "eval")
  ms = [1, 9]
  res = evaluate.sweep(config, workdir, ms, ["builtin"], out, limit=10)
  sizes = {k: len(v) for k, v in evaluate.load_benchmarks(config, ["builtin"], workdir, 10).items()}
  assert sizes["synthetic"] == 10 and min(sizes.values()) >= 4
  printed = capsys.readouterr().out
  assert res["ms"] == ms and res["benchmarks"] == list(evaluate.BUILTIN)
  for m in ms:
    entry = res["per_m"][m]
    # Counted XLA compiles: the same number for every m, and none while batches run
    # (up to 10 questions per benchmark: 8 batches of 8 per m, one program).
    assert entry["xla_compiles_during_batches"] == 0
    assert entry["xla_compiles_setup"] == res["per_m"][ms[0]]["xla_compiles_setup"]
    for name in evaluate.BUILTIN:
      value = entry["benchmarks"][name][evaluate.HEADLINE[name]]
      assert 0.0 <= value <= 1.0
      assert entry["benchmarks"][name]["n"] == sizes[name]
    assert entry["prefill_ms_per_batch"] > 0
    assert entry["decode_tokens_per_s"] is None or entry["decode_tokens_per_s"] > 0
  # FLOPs grow with m (the program runs m latents and T + m - 1 slots).
  totals = [res["per_m"][m]["flops"]["prefill"] for m in ms]
  assert totals[0] < totals[1]
  for name in ("results.json", "results.csv", "accuracy_vs_m.png", "accuracy_vs_flops.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for name in ("accuracy_vs_m.png", "accuracy_vs_flops.png"):
    with Image.open(os.path.join(out, name)) as img:
      assert img.format == "PNG" and img.size[0] > 300
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert set(saved["per_m"]) == {"1", "9"}
  with open(os.path.join(out, "predictions", "gqa_m9.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == sizes["gqa"] and all("prediction" in r for r in rows)
  assert "synthetic accuracy" in printed and "prefill GFLOPs/image" in printed
  assert "m=9" in printed


def test_bad_m_benchmark_or_checkpoint_fail_before_compute(trained, tmp_path):
  config, workdir = trained
  with pytest.raises(ValueError, match=r"m=10 is out of range: 1 <= m <= M=9"):
    evaluate.sweep(config, workdir, [4, 10], ["builtin"], str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"m=0 is out of range"):
    evaluate.sweep(config, workdir, [0], ["builtin"], str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"unknown benchmark 'coco'"):
    evaluate.sweep(config, workdir, [4], ["coco"], str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"--config.eval.benchmarks.mme.root is not set"):
    evaluate.sweep(config, workdir, [4], ["mme"], str(tmp_path / "a"))
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=rf"checkpoint folder {missing} does not exist"):
    evaluate.sweep(config, workdir, [4], ["builtin"], str(tmp_path / "a"), checkpoint=missing)
  with pytest.raises(ValueError, match=r"--config.init.clip is not set .*\n.*--config.init.llm "
                     r"is not set"):
    evaluate.sweep(config, workdir, [4], ["builtin"], str(tmp_path / "a"), checkpoint="hf")
  evaluate.builtin_benchmark_dir(config, workdir)  # Written with seed 0 (if not yet).
  other = config.copy_and_resolve_references()
  other.data.builtin_seed = 1  # Not what the benchmark files under data_dir were written with.
  with pytest.raises(ValueError, match=r"mqt_synthetic_benchmarks holds the built-in benchmark "
                     r"files prepared with .*'seed': 0.*'seed': 1.* is asked for"):
    evaluate.sweep(other, workdir, [4], ["builtin"], str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()


def test_a_prompt_too_long_is_named(trained, tmp_path):
  config, workdir = trained
  short = config.copy_and_resolve_references()
  short.data.max_len = 16  # 8 text tokens beside 9 visual ones: every prompt is longer.
  with pytest.raises(ValueError, match=r"benchmark synthetic, question eval_0: the prompt has "
                     r"\d+ tokens, more than the 8"):
    evaluate.sweep(short, workdir, [4], ["synthetic"], str(tmp_path / "b"))
  # The evaluation's own sequence length wins over config.data.max_len.
  short.data.max_len, short.eval.data.max_len = 2048, 16
  with pytest.raises(ValueError, match=r"question eval_0: the prompt has \d+ tokens, more than "
                     r"the 8 .*config.eval.data.max_len"):
    evaluate.sweep(short, workdir, [4], ["synthetic"], str(tmp_path / "c"))


def test_answers_do_not_depend_on_batch_mates(trained):
  """A row's greedy answer is the same alone and in a batch of prompts of other lengths."""
  config, workdir = trained
  loaded = inference.load(config, workdir)
  qs = evaluate.load_benchmarks(config, ["synthetic", "scienceqa"], workdir, limit=2)
  questions = qs["synthetic"] + qs["scienceqa"]
  prompts = [inference.encode_prompt(q.prompt, loaded.tokenizer, True) for q in questions]
  assert len({len(p) for p in prompts}) > 1
  text_len = max(len(p) for p in prompts)
  ids, mask = inference.pad_prompts(prompts, text_len)
  images = inference.load_images([q.image for q in questions], config.model.vision.image_size)
  sampling = inference.sampling_config(config.eval.generation, loaded.tokenizer)
  together = inference.Answerer(loaded, 4, len(prompts), text_len, sampling)(images, ids, mask)
  one = inference.Answerer(loaded, 4, 1, text_len, sampling)
  alone = [one(images[i:i + 1], ids[i:i + 1], mask[i:i + 1])[0] for i in range(len(prompts))]
  assert together == alone
  assert any(together)  # Random weights still emit text.


def _predict(args):
  return subprocess.run([sys.executable, "predict.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_predict_requires_and_validates_m(trained, tmp_path):
  config, workdir = trained
  image = tmp_path / "img.png"
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(image)
  common = ["--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.data_dir={config.data.data_dir}", "--config.run_stages=1",
            f"--image={image}", "--prompt=What color is the circle?"]
  no_m = _predict(common)
  assert no_m.returncode != 0 and "--m" in no_m.stderr
  too_big = _predict(common + ["--m=10"])
  assert too_big.returncode != 0 and "m=10 is out of range: 1 <= m <= M=9" in too_big.stderr
  ok = _predict(common + ["--m=3", "--max_new_tokens=3"])
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip() == inference.answer(
      inference.load(config, workdir), [str(image)], ["What color is the circle?"], 3,
      _with(config.eval.generation, max_new_tokens=3))[0]


def _with(cfg, **kw):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.update(kw)
  return cfg


def test_decode_rate_is_claimed_only_when_measurable():
  """Decode tok/s = tokens / (generation time - batches x prefill); None when the
  decode share is under 5% of generation (noise), never a huge or negative rate."""
  assert evaluate.decode_rate(10.0, 4, 1.5, 200) == pytest.approx(200 / 4.0)
  assert evaluate.decode_rate(10.0, 4, 2.45, 200) is None  # 0.2 s of 10 s.
  assert evaluate.decode_rate(10.0, 4, 2.6, 200) is None  # Negative.
  assert evaluate.decode_rate(10.0, 4, 1.0, 0) is None
  assert evaluate._rate_text(None) == "n/a" and evaluate._rate_text(1234.4) == "1,234"


def test_memory_is_planned_before_weights_and_a_run_that_cannot_fit_stops(trained, tmp_path,
                                                                          monkeypatch):
  config, workdir = trained
  plan = evaluate.sweep(config, workdir, [2, 9], ["builtin"], str(tmp_path / "dry"),
                        dry_run=True)
  assert not (tmp_path / "dry").exists()  # No data, results or weights touched.
  assert plan["m"] == 9 and plan["batch_size"] == config.eval.generation.batch_size
  fig = plan["compiled"]
  # Arguments: the parameters the program reads (blocks after the selected vision layer
  # are never run) and the inputs.
  assert 0.9 * fig["params_bytes"] < fig["argument_bytes"] < fig["peak_bytes"]
  assert plan["host_bytes"] > fig["peak_bytes"]
  acc = plan["accelerator"]
  assert acc["total_bytes"] == acc["params_bytes"] + acc["kv_cache_bytes"] + acc["activation_bytes"]
  # The parameter bytes counted from shapes equal the compiled program's own count.
  assert acc["params_bytes"] == fig["params_bytes"]

  def no_load(*args, **kwargs):
    raise AssertionError("weights were loaded")
  monkeypatch.setattr(inference, "load", no_load)
  monkeypatch.setattr(mem_lib, "host_available_bytes", lambda: 2**20)
  with pytest.raises(MemoryError, match=r"needs [\d.]+ GiB of host memory .* more than the "
                     r"1.0 MiB available; stopping before loading weights"):
    evaluate.sweep(config, workdir, [4], ["synthetic"], str(tmp_path / "full"), limit=2)


def test_predict_dry_run_prints_memory_and_reads_no_image(trained, tmp_path):
  config, workdir = trained
  common = ["--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.data_dir={config.data.data_dir}", "--config.run_stages=1",
            f"--image={tmp_path / 'not_there.png'}", "--prompt=What color is the circle?"]
  dry = _predict(common + ["--m=3", "--dry_run"])
  assert dry.returncode == 0, dry.stderr
  assert dry.stdout == ""  # stdout carries answers only.
  assert "memory of a generation run at m=3, batch 1" in dry.stderr
  assert "a CPU run on this host:" in dry.stderr
  real = _predict(common + ["--m=3"])
  assert real.returncode != 0 and "not_there.png does not exist" in real.stderr
