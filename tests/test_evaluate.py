"""The evaluation sweep over m and the predict command, on a briefly trained tiny model."""
import json
import os
import re
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
from mqt import plots
from mqt.benchmarks import common as bench_common
from mqt.benchmarks import registry
from mqt.model import MQTLLaVA, ModelConfig, dummy_inputs
from mqt import run_inputs
from bench.common import count_compiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.data.builtin_sizes.update(dict(captions=32, instruct=32, eval=32))
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
  run_inputs.open_source(config, config.stage1.data, workdir)  # Prepares data + tokenizer.
  model_cfg = ModelConfig.from_config(config.model)
  params = nn.unbox(MQTLLaVA(model_cfg).init(jax.random.key(0), *dummy_inputs(model_cfg),
                                             16))["params"]
  saver = ckpt_lib.Checkpointer(run_inputs.default_checkpoint(config, workdir), every=1, keep=1,
                                use_async=False)
  saver.save(1, {"params": params, "step": 1}, None, force=True)
  saver.close()
  _prepare_builtin(str(root / "data"), workdir)
  return config, workdir


def _prepare_builtin(data_dir: str, workdir: str, seed: int = 0):
  """The preparation of the built-in benchmark files for `_config(data_dir)` -> its folder."""
  config = _config(data_dir)
  config.data.builtin_seed = seed
  return run_inputs.prepare_builtin_benchmarks(config, workdir)


def _counting_answerer(monkeypatch) -> list:
  """Makes the sweep's Answerers log (m, "setup" | "batch", XLA compiles) -> the log."""
  log = []

  class Counted(inference.Answerer):
    def __init__(self, loaded, m, *args, **kwargs):
      with count_compiles() as n:
        super().__init__(loaded, m, *args, **kwargs)
      log.append((m, "setup", n()))

    def prefill_latency(self, *args, **kwargs):
      with count_compiles() as n:
        out = super().prefill_latency(*args, **kwargs)
      log.append((self.m, "setup", n()))
      return out

    def __call__(self, *args, **kwargs):
      with count_compiles() as n:
        out = super().__call__(*args, **kwargs)
      log.append((self.m, "batch", n()))
      return out

  monkeypatch.setattr(inference, "Answerer", Counted)
  return log


def test_sweep_writes_table_plots_and_compiles_once_per_m(trained, capsys, monkeypatch):
  config, workdir = trained
  out = os.path.join(workdir, "eval")
  ms = [1, 9]
  log = _counting_answerer(monkeypatch)
  res = evaluate.sweep(config, workdir, ms, ["builtin"], out, limit=10,
                       chance={"synthetic": lambda qs: 0.25})
  sizes = {k: len(v) for k, v in evaluate.load_benchmarks(config, ["builtin"], workdir, 10).items()}
  assert sizes["synthetic"] == 10 and min(sizes.values()) >= 4
  printed = capsys.readouterr().out
  builtin = registry.builtin_names()
  assert res["ms"] == ms and res["benchmarks"] == list(builtin)
  # Counted XLA compiles: the same number for every m, and none while batches run (up to 10
  # questions per benchmark, one program for every batch). Results hold no counts.
  setup = {m: sum(n for mm, kind, n in log if mm == m and kind == "setup") for m in ms}
  assert setup[1] == setup[9] > 0
  batches = len(ms) * sum(-(-n // 8) for n in sizes.values())  # Batches of 8.
  assert [n for _, kind, n in log if kind == "batch"] == [0] * batches
  assert not any("compiles" in k for k in res["per_m"][1])
  for m in ms:
    entry = res["per_m"][m]
    for name in builtin:
      value = entry["benchmarks"][name][registry.get(name).headline]
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
  # The references are written as JSON: human answer lists for VQA, letters for ScienceQA.
  with open(os.path.join(out, "predictions", "vqav2_m1.jsonl")) as f:
    vqa = [json.loads(line)["answer"] for line in f]
  assert len(vqa) == sizes["vqav2"]
  assert all(isinstance(a, list) and a and all(isinstance(x, str) for x in a) for a in vqa)
  with open(os.path.join(out, "predictions", "scienceqa_m1.jsonl")) as f:
    assert all(json.loads(line)["answer"] in "ABCDE" for line in f)
  assert saved["sources"] == {n: "builtin" for n in builtin}
  assert set(saved["baselines"]) == set(builtin)
  for name, b in saved["baselines"].items():
    assert set(b) == {"chance", "image_blind"} and 0.0 <= b["chance"] <= 1.0, name
  assert saved["baselines"]["pope"]["chance"] > 0.5  # F1 of always "yes".
  assert saved["baselines"]["synthetic"]["chance"] == 0.25  # The caller's.
  assert printed.count("  baselines") == len(builtin)
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
  empty = config.copy_and_resolve_references()
  empty.data.data_dir = str(tmp_path / "no_data")  # The built-in files were never prepared.
  with pytest.raises(FileNotFoundError, match=r"the built-in benchmark files are not in "
                     r".*no_data/mqt_synthetic_benchmarks: prepare them first"):
    evaluate.load_benchmarks(empty, ["builtin"], workdir)
  assert not (tmp_path / "a").exists() and not (tmp_path / "no_data").exists()


def test_the_command_prepares_the_builtin_files_once_with_the_configs_settings(
    trained, capsys):
  config, workdir = trained
  data_dir = config.data.data_dir
  capsys.readouterr()
  again = _prepare_builtin(data_dir, workdir)  # Already there: checked, not written.
  assert "writing" not in capsys.readouterr().out
  assert again == run_inputs.builtin_benchmark_dir(config, workdir)
  other = subprocess.run(
      [sys.executable, "evaluate.py", "--config=configs/tiny.py", f"--workdir={workdir}",
       f"--config.data.data_dir={data_dir}", "--config.run_stages=1",
       "--config.data.builtin_sizes.eval=32", "--config.data.builtin_seed=1", "--ms=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert other.returncode == 1, other.stderr
  assert re.search(r"error: .*mqt_synthetic_benchmarks holds the built-in benchmark files "
                   r"prepared with .*'seed': 0.*'seed': 1.* is asked for", other.stderr)


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
  qs = evaluate.load_benchmarks(config, ["builtin"], workdir, limit=2)
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


# ---------------------------------------------------------------------------
# Benchmarks from the user's files; named benchmarks need their paths.

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def _photo(name: str, path) -> str:
  """A scikit-image sample photo, shrunk, written to path (JPEG or PNG by suffix)."""
  from skimage import data as skdata  # pylint: disable=import-outside-toplevel
  img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
  img.thumbnail((48, 48))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path)
  return str(path)


def _dump(path, obj, lines: bool = False) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj))
  return str(path)


def _user_benchmarks(root) -> dict:
  """Tiny POPE, ScienceQA, VQAv2 and GQA files in the published formats, with photos.
  -> the config.eval.benchmarks fields to set."""
  coco = root / "coco"
  for i, name in enumerate(_PHOTOS, 1):
    _photo(name, coco / f"COCO_val2014_{i:012d}.jpg")
  pope = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
           "text": "Is there a person in the image?", "label": "yes", "category": "random"},
          {"question_id": 2, "image": "COCO_val2014_000000000002.jpg",
           "text": "Is there a person in the image?", "label": "no", "category": "random"},
          {"question_id": 3, "image": "COCO_val2014_000000000002.jpg",
           "text": "Is there a cat in the image?", "label": "yes", "category": "random"}]
  _dump(root / "pope" / "coco_pope_random.json", pope, lines=True)
  _dump(root / "pope" / "coco_pope_adversarial.json",  # A JSON list is accepted too.
        [dict(r, label="no" if r["label"] == "yes" else "yes") for r in pope[:2]])
  sqa = root / "scienceqa"
  _photo("rocket", sqa / "images" / "test" / "10" / "image.png")  # The release layout.
  _photo("coffee", sqa / "images" / "test" / "11" / "image.png")
  problems = {
      "10": {"question": "What is shown?", "choices": ["a rocket", "a cup", "a cat"],
             "answer": 0, "hint": "A launch pad.", "image": "image.png", "split": "test",
             "subject": "natural science"},
      "11": {"question": "What is shown?", "choices": ["a rocket", "a cup"], "answer": 1,
             "hint": "", "image": "image.png", "split": "test", "subject": "social science"},
      "12": {"question": "No picture?", "choices": ["yes", "no"], "answer": 0, "hint": "",
             "image": None, "split": "test", "subject": "language science"}}
  _dump(sqa / "problems.json", problems)
  _dump(sqa / "pid_splits.json", {"test": ["10", "11", "12"], "train": []})
  questions = [(101, 1, "What is the person wearing?", ["spacesuit"] * 7 + ["suit"] * 3),
               (102, 2, "What animal is this?", ["cat"] * 10),
               (103, 3, "What is in the cup?", ["coffee"] * 9 + ["tea"]),
               (104, 5, "What is the man holding?", ["camera"] * 10)]
  _dump(root / "vqa" / "questions.json", {"data_subtype": "val2014", "questions": [
      {"question_id": q, "image_id": i, "question": t} for q, i, t, _ in questions]})
  _dump(root / "vqa" / "annotations.json", {"annotations": [
      {"question_id": q, "image_id": i, "answer_type": "other", "question_type": "what is",
       "multiple_choice_answer": a[0], "answers": [{"answer": x, "answer_id": k + 1}
                                                   for k, x in enumerate(a)]}
      for q, i, _, a in questions]})
  _dump(root / "gqa" / "testdev_balanced_questions.json", {
      "g1": {"imageId": "COCO_val2014_000000000004", "question": "What is flying?",
             "answer": "rocket", "types": {"structural": "query", "detailed": "objThisChoose"}},
      "g2": {"imageId": "COCO_val2014_000000000002", "question": "Is the cat sleeping?",
             "answer": "no", "types": {"structural": "verify", "detailed": "activity"}}})
  return {"pope": {"folder": str(root / "pope"), "image_folder": str(coco)},
          "scienceqa": {"problems": str(sqa / "problems.json"),
                        "pid_splits": str(sqa / "pid_splits.json"),
                        "image_folder": str(sqa / "images")},
          "vqav2": {"questions": str(root / "vqa" / "questions.json"),
                    "annotations": str(root / "vqa" / "annotations.json"),
                    "image_folder": str(coco)},
          "gqa": {"questions": str(root / "gqa" / "testdev_balanced_questions.json"),
                  "image_folder": str(coco)}}


def _with_paths(config, paths: dict):
  config = config.copy_and_resolve_references()
  for name, fields in paths.items():
    config.eval.benchmarks[name].update(fields)
  return config


def test_user_benchmark_files_load_and_score(tmp_path):
  config = _with_paths(tiny.get_config(), _user_benchmarks(tmp_path / "files"))
  workdir = tmp_path / "run"
  benches = evaluate.load_benchmarks(config, ["pope", "scienceqa", "vqav2", "gqa"],
                                     str(workdir))
  assert not workdir.exists()  # No built-in files were written or read.
  assert {n: len(q) for n, q in benches.items()} == {"pope": 5, "scienceqa": 2, "vqav2": 4,
                                                    "gqa": 2}
  images = inference.load_images([q.image for qs in benches.values() for q in qs], 32)
  assert images.shape == (13, 32, 32, 3) and float(images.std()) > 0.1  # Real photos.
  pope, sqa, vqa, gqa = (benches[n] for n in ("pope", "scienceqa", "vqav2", "gqa"))
  assert pope[0].qid == "adversarial/1" and pope[0].answer == "no"
  assert sqa[0].prompt.startswith("Context: A launch pad.\nWhat is shown?\nA. a rocket\n")
  assert vqa[0].image.endswith("COCO_val2014_000000000001.jpg")
  assert vqa[0].answer == ["spacesuit"] * 7 + ["suit"] * 3

  score = lambda name, preds: registry.get(name).score(benches[name], preds)
  m = score("pope", {q.qid: "Yes" for q in pope})
  assert m["random/accuracy"] == pytest.approx(2 / 3) and m["adversarial/accuracy"] == 0.5
  assert m["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
  assert score("scienceqa", {"10": "A", "11": "The answer is A."})["accuracy"] == 0.5
  m = score("vqav2", {"101": "Suit", "102": "a cat", "103": "coffee", "104": "phone"})
  assert m["accuracy"] == pytest.approx((0.9 + 1 + 1 + 0) / 4)
  assert score("gqa", {"g1": "Rocket.", "g2": "yes"})["accuracy"] == 0.5

  b = {n: registry.baselines(n, q) for n, q in benches.items()}
  assert b["pope"]["chance"] == pytest.approx((0.8 + 2 / 3) / 2)
  assert b["scienceqa"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  # One question form ("what is"), every answer once: the first, "spacesuit", for all.
  assert b["vqav2"] == {"chance": 0.0, "image_blind": pytest.approx(0.25)}
  # The predictions files hold the reference as JSON: the human answers for VQA.
  assert json.loads(json.dumps(evaluate.answer_json(vqa[0].answer))) == vqa[0].answer
  assert evaluate.answer_json(("a", 1)) == ["a", 1] and evaluate.answer_json("B") == "B"


def test_named_benchmarks_without_paths_fail_together_before_any_read(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.eval.benchmarks.vqav2.questions = "/data/vqa/questions.json"  # Partly set.
  def no_read(*args, **kwargs):
    raise AssertionError("a checkpoint or weights were read")
  monkeypatch.setattr(run_inputs, "resolve_paths", no_read)
  monkeypatch.setattr(inference, "load", no_read)
  workdir, out = tmp_path / "run", tmp_path / "out"
  names = ["synthetic", "pope", "scienceqa", "vqav2", "gqa", "mme"]
  with pytest.raises(ValueError) as e:
    evaluate.sweep(config, str(workdir), [1], names, str(out))
  lines = str(e.value).split("\n")
  assert [l.split(":")[0] for l in lines] == [f"benchmark {n}" for n in names[1:]]
  assert lines[0].startswith("benchmark pope: --config.eval.benchmarks.pope.folder, "
                             "--config.eval.benchmarks.pope.image_folder are not set")
  assert "--benchmarks=builtin for the built-in synthetic pope" in lines[0]
  assert ("benchmark vqav2: --config.eval.benchmarks.vqav2.annotations, "
          "--config.eval.benchmarks.vqav2.image_folder are not set") in lines[2]
  assert "vqav2.questions" not in lines[2]
  assert lines[4].startswith("benchmark mme: --config.eval.benchmarks.mme.root is not set")
  assert "builtin" not in lines[4]  # MME has no built-in version.
  with pytest.raises(ValueError, match=r"^benchmark gqa: .*gqa\.questions"):
    evaluate.load_benchmarks(config, ["builtin", "gqa"], str(workdir))
  assert not workdir.exists() and not out.exists()
  assert evaluate.benchmark_sources(["builtin", "gqa"]) == {
      "synthetic": "builtin", "pope": "builtin", "scienceqa": "builtin", "vqav2": "builtin",
      "gqa": "files"}
  assert evaluate.expand_names(["synthetic", " ", "builtin"]) == list(registry.builtin_names())


def test_builtin_reads_the_synthetic_files_even_when_paths_are_set(trained, capsys):
  config, workdir = trained
  config = _with_paths(config, {"pope": {"folder": "/data/pope", "image_folder": "/data/coco"}})
  benches = evaluate.load_benchmarks(config, ["builtin"], workdir, limit=2)
  root = run_inputs.builtin_benchmark_dir(config, workdir)
  assert all(q.image.startswith(root) for q in benches["pope"])
  printed = capsys.readouterr().out
  assert ("note: --benchmarks=builtin evaluates the built-in synthetic pope; "
          "config.eval.benchmarks.pope is read only with --benchmarks=pope") in printed
  assert "synthetic gqa" not in printed  # No gqa path is set.


def test_sweep_on_user_files(trained, tmp_path):
  config, workdir = trained
  config = _with_paths(config, _user_benchmarks(tmp_path / "files"))
  out = tmp_path / "eval"
  res = evaluate.sweep(config, workdir, [2], ["pope", "vqav2"], str(out))
  assert res["sources"] == {"pope": "files", "vqav2": "files"}
  assert res["per_m"][2]["benchmarks"]["vqav2"]["n"] == 4
  with open(out / "predictions" / "vqav2_m2.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["qid"] for r in rows] == ["101", "102", "103", "104"]
  assert rows[1]["answer"] == ["cat"] * 10 and all(isinstance(r["prediction"], str)
                                                   for r in rows)
  with open(out / "results.json") as f:
    assert json.load(f)["baselines"]["pope"]["chance"] == pytest.approx((0.8 + 2 / 3) / 2)


def _echo_benchmark() -> bench_common.Benchmark:
  """A benchmark in no module of mqt/benchmarks/ (what a new module's BENCHMARK holds): a
  JSON list of {"id", "image", "question", "answer"}, scored by exact match."""
  def load(path, image_folder):
    recs = bench_common.load_json(path, "echo questions (a JSON list)", list)
    return [bench_common.Question(
        r["id"], bench_common.image(image_folder, r["image"], r["id"], "echo", path),
        r["question"] + bench_common.SHORT_SUFFIX, r["answer"]) for r in recs]

  def score(questions, predictions):
    bench_common.check(questions, predictions, "echo")
    right = [float(bench_common.gqa_normalize(predictions[q.qid]) == q.answer)
             for q in questions]
    return {"accuracy": bench_common.mean(right), "n": float(len(right))}

  return bench_common.Benchmark(
      name="echo", load=load, score=score, headline="accuracy",
      fields={"json": "", "image_folder": ""},
      from_config=lambda b, workdir: load(b.json, b.image_folder))


def test_a_new_benchmark_is_one_registry_entry(trained, tmp_path, monkeypatch, capsys):
  """Registering a benchmark is all it takes: its config block, path checks, loading,
  scoring, baselines, table, predictions and plots follow from the registry."""
  config, workdir = trained
  monkeypatch.setitem(registry.REGISTRY, "echo", _echo_benchmark())
  fresh = tiny.get_config()
  assert dict(fresh.eval.benchmarks.echo) == {"json": "", "image_folder": ""}
  with pytest.raises(ValueError, match=r"^benchmark echo: --config.eval.benchmarks.echo.json, "
                     r"--config.eval.benchmarks.echo.image_folder are not set"):
    evaluate.check_benchmark_paths(fresh, ["echo"])
  assert "echo" not in evaluate.expand_names(["builtin"])  # It has no built-in version.
  for i, name in enumerate(_PHOTOS[:3]):
    _photo(name, tmp_path / "img" / f"{i}.png")
  json_path = _dump(tmp_path / "echo.json", [
      {"id": f"e{i}", "image": f"{i}.png", "question": "What is shown?", "answer": a}
      for i, a in enumerate(("rocket", "rocket", "cup"))])
  config = config.copy_and_resolve_references()
  config.eval.benchmarks = fresh.eval.benchmarks
  config.eval.benchmarks.echo.update({"json": json_path, "image_folder": str(tmp_path / "img")})
  out = tmp_path / "eval"
  res = evaluate.sweep(config, workdir, [1], ["echo"], str(out))
  assert res["benchmarks"] == ["echo"] and res["sources"] == {"echo": "files"}
  assert res["per_m"][1]["benchmarks"]["echo"]["n"] == 3
  # Open-ended: chance 0; "rocket" for the one question form: 2 of 3 right.
  assert res["baselines"]["echo"] == {"chance": 0.0, "image_blind": pytest.approx(2 / 3)}
  assert re.search(r"\necho accuracy +\d\.\d{3}\n  baselines +chance 0\.000, image-blind "
                   r"0\.667\n", capsys.readouterr().out)
  with open(out / "predictions" / "echo_m1.jsonl") as f:
    assert [json.loads(line)["answer"] for line in f] == ["rocket", "rocket", "cup"]
  assert (out / "accuracy_vs_m.png").exists()


# ---------------------------------------------------------------------------
# Plots: readable ticks and baselines.

def _fake_results(ms, text_len=20, params=7e9):
  """Results as the sweep writes them, for a 7B-like model (2 x params FLOPs per token)."""
  per = {m: {"flops": {"prefill": 2 * params * (text_len + m)},
             "benchmarks": {"pope": {"f1": 0.70 + 0.02 * i},
                            "mme": {"perception": 1100.0 + 40 * i},
                            "vqav2": {"accuracy": 0.5 + 0.03 * i}}}
         for i, m in enumerate(ms)}
  return {"ms": ms, "per_m": per, "benchmarks": ["pope", "mme", "vqav2"],
          "headline": {"pope": "f1", "mme": "perception", "vqav2": "accuracy"},
          "checkpoint": "/ckpt/stage2/checkpoints", "sources": {"pope": "builtin"},
          "baselines": {"pope": {"chance": 0.667, "image_blind": 0.5},
                        "mme": {"chance": 750.0, "image_blind": 820.0},
                        "vqav2": {"chance": 0.0, "image_blind": 0.21}}}


def _tick_labels(fig, ax):
  """The drawn x tick labels (major and minor) inside the view, with their boxes."""
  renderer = fig.canvas.get_renderer()
  lo, hi = ax.get_xlim()
  out = []
  for labels, locs in ((ax.xaxis.get_majorticklabels(), ax.xaxis.get_majorticklocs()),
                       (ax.xaxis.get_minorticklabels(), ax.xaxis.get_minorticklocs())):
    for label, loc in zip(labels, locs):
      if label.get_visible() and label.get_text() and lo <= loc <= hi:
        out.append((label.get_text(), label.get_window_extent(renderer)))
  return out


@pytest.mark.parametrize("text_len", [20, 600])
def test_plot_ticks_do_not_overlap_and_baselines_are_drawn(text_len):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ms = [1, 2, 4, 8, 16, 36, 64, 144, 256]
  res = _fake_results(ms, text_len)
  for kind in ("m", "flops"):
    fig = plots.make_figure(res, kind)
    fig.canvas.draw()
    for ax, name in zip(fig.axes, res["benchmarks"]):
      labels = _tick_labels(fig, ax)
      texts = [t for t, _ in labels]
      assert len(texts) >= 3, (kind, texts)
      assert all(re.fullmatch(r"[\d,.]+", t) for t in texts), texts  # Plain numbers.
      boxes = [b for _, b in labels]
      overlaps = [(texts[i], texts[j]) for i in range(len(boxes))
                  for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
      assert not overlaps, (kind, name, overlaps)
      if kind == "m":
        assert texts[0] == "1" and texts[-1] == "256"
      curve = ax.get_lines()[0]
      dashed = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
      want = res["baselines"][name]
      assert [l.get_label().split(" ")[0] for l in dashed] == ["chance", "image-blind"]
      assert [l.get_ydata()[0] for l in dashed] == [want["chance"], want["image_blind"]]
      assert all(l.get_color() == curve.get_color() for l in dashed)
      legend = [t.get_text() for t in ax.get_legend().get_texts()]
      assert legend[1:] == [l.get_label() for l in dashed]
    colours = {ax.get_lines()[0].get_color() for ax in fig.axes[:3]}
    assert len(colours) == 3  # One colour per benchmark.
    if kind == "flops":
      unit = "TFLOPs" if text_len == 600 else "GFLOPs"
      assert fig.axes[0].get_xlabel() == f"prefill {unit} per image"
    plt.close(fig)


def test_plot_writes_both_files_with_or_without_baselines(tmp_path):
  res = _fake_results([2, 4])
  paths = plots.plot(res, str(tmp_path))
  del res["baselines"]
  os.makedirs(tmp_path / "old")
  paths += plots.plot(res, str(tmp_path / "old"))
  for p in paths:
    with Image.open(p) as img:
      assert img.format == "PNG" and img.size[0] > 600


def test_maps_command_reads_only_the_tower_and_query_transformer(trained, tmp_path):
  config, workdir = trained
  loaded = inference.load(config, workdir, components=("vision", "query"))
  assert set(loaded.params) == {"vision", "query"} and loaded.tokenizer is None
  image = tmp_path / "img.png"
  pixels = np.zeros((40, 30, 3), np.uint8)
  pixels[5:20, 5:20] = (220, 30, 30)
  Image.fromarray(pixels).save(image)
  common = ["maps.py", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.data_dir={config.data.data_dir}", "--config.run_stages=1",
            f"--image={image}"]
  out = tmp_path / "maps.png"
  bad = subprocess.run([sys.executable, *common, "--ms=0,12", f"--out={tmp_path}/no/m.png"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2, bad.stderr
  for line in ("--ms=0,12: m=0 is out of range", "--ms=0,12: m=12 is out of range",
               f"--out={tmp_path}/no/m.png: the folder {tmp_path}/no does not exist"):
    assert line in bad.stderr, bad.stderr
  ok = subprocess.run([sys.executable, *common, "--ms=1,4", f"--out={out}", "--attention=always"],
                      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert f"wrote {out}: 2 rows (m = 1, 4), 5 gradient maps over a 3x3 patch grid" in ok.stdout
  att = tmp_path / "maps_attention.png"
  assert f"wrote {att}: the query transformer's attention weights" in ok.stdout
  for path in (out, att):
    with Image.open(path) as png:
      assert png.format == "PNG" and png.size[0] > png.size[1]
