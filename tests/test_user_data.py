"""End to end on a small real dataset the user brings (tests/user_dataset.py).

Photos from scikit-image and digits from scikit-learn, LLaVA JSON with one or more
broken records of every kind, held-out conversation and benchmark files. The
commands run as a user runs them (subprocesses, one CPU device): train a tokenizer,
prepare, train both stages, evaluate on the benchmarks, predict. One module-scoped
workdir: the stages are trained once and reused by the evaluation and prediction.
"""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests import user_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
BATCH = 8
# A tiny recipe: a few steps of stage 1, every m evaluated at 1 and 9 (stage 2's steps:
# `_epoch`).
TINY = ["--config=configs/tiny.py", "--config.stage1.steps=3",
        f"--config.stage1.data.batch_size={BATCH}", f"--config.stage2.data.batch_size={BATCH}",
        "--config.checkpoint.use_async=False", "--config.log_every=1",
        "--config.eval.ms=(1,9)", "--config.eval.data.batch_size=32"]


def _epoch(ds) -> str:
  """Stage 2 steps that meet every record at least once: the over-long record is only
  judged when a batch tokenizes it. One sample per round, batches of one modality
  (at most one part-filled batch per modality)."""
  return f"--config.stage2.steps={-(-ds['n_rounds'] // BATCH) + 2}"


def _env():
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR="/tmp/mqt_test_jax_cache",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _run(*args):
  """Runs `python <args>` in the repository; -> CompletedProcess (text)."""
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=TIMEOUT)


def _ok(proc):
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  return proc.stdout + proc.stderr


def _lines(text: str, *needles: str) -> list[str]:
  return [line for line in text.splitlines() if all(n in line for n in needles)]


def _reason_named(line: str, reason: str) -> bool:
  """The line names `reason` by its key (data/records.py REASONS)."""
  return re.search(rf"\b{reason}\b", line) is not None


def _assert_names_record(proc, path: str, index: int, rid: str, reason: str):
  """The run failed with one line naming the file, the record's index and id and the
  reason, and no traceback."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  hits = _lines(proc.stdout + proc.stderr, os.path.basename(path), rid)
  assert hits, (proc.stdout[-2000:], proc.stderr[-3000:])
  line = hits[0]
  assert path in line, line
  assert re.search(rf"\brecord {index}\b", line.replace(path, "")), line
  assert f"'{rid}'" in line or f'"{rid}"' in line, line
  assert _reason_named(line, reason), line


def _skipped(data: dict) -> dict:
  """{reason: n > 0} from a summary's data accounting."""
  return {r: n for r, n in data["skipped"].items() if n}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  return user_dataset.write(str(tmp_path_factory.mktemp("user_data")))


@pytest.fixture(scope="module")
def tokenizer(ds):
  out = os.path.join(ds["root"], "tok", "tokenizer.model")
  proc = _run("-m", "data.tokenizer", f"--json={ds['train_json']},{ds['captions_json']}",
              f"--out={out}", "--vocab_size=1024")
  _ok(proc)
  return out


def _user_args(ds, tokenizer, eval_json=True):
  """The overrides of a run on the user's data: json paths, kinds left to inference."""
  args = [f"--config.tokenizer_path={tokenizer}",
          f"--config.stage1.data.json_path={ds['captions_json']}",
          f"--config.stage1.data.image_folder={ds['image_folder']}",
          f"--config.stage2.data.json_path={ds['train_json']}",
          f"--config.stage2.data.image_folder={ds['image_folder']}"]
  if eval_json:
    args += [f"--config.eval.data.json_path={ds['heldout_json']}",
             f"--config.eval.data.image_folder={ds['image_folder']}"]
  return args


@pytest.fixture(scope="module")
def trained(ds, tokenizer):
  """Both stages on the user's JSON, skipping the broken records (grain workers), then
  the end-of-run evaluation on the held-out JSON. -> (workdir, log, summary)."""
  workdir = os.path.join(ds["root"], "run")
  proc = _run("train.py", *TINY, _epoch(ds), f"--workdir={workdir}",
              *_user_args(ds, tokenizer), "--config.data.on_error=skip",
              "--config.data.overlong=reject", "--config.data.worker_count=2")
  log = _ok(proc)
  with open(os.path.join(workdir, "summary.json")) as f:
    return workdir, log, json.load(f)


@pytest.fixture(scope="module")
def prepared(ds):
  """`python -m data.prepare` with on_error=skip. -> (prepared folder, output)."""
  proc = _run("-m", "data.prepare", "--kind=llava", f"--json={ds['train_json']}",
              f"--image_folder={ds['image_folder']}", "--name=mine",
              f"--data_dir={os.path.join(ds['root'], 'tfds')}", "--on_error=skip")
  out = _ok(proc)
  folder = re.search(r"prepared: (\S+)", out)
  assert folder, out[-2000:]
  return folder.group(1), out


def test_the_dataset_is_real_and_broken_as_declared(ds):
  assert 110 <= ds["n_images"] <= 150
  with open(ds["train_json"]) as f:
    records = json.load(f)
  assert len(records) == ds["n_records"]
  assert {b["reason"] for b in ds["broken"]} == set(user_dataset.REASONS)
  from data import records as records_lib  # pylint: disable=import-outside-toplevel
  assert set(user_dataset.REASONS) <= set(records_lib.REASONS)
  assert sum(ds["expected_skipped"].values()) == len(ds["broken"]) == 14
  for b in ds["broken"]:
    assert records[b["index"]].get("id") == b["id"]
  assert ds["first_broken"] == {"index": 3, "id": "bad-0", "reason": "missing_image"}
  texts = [r for r in records if "image" not in r and "conversations" in r]
  multi = [r for r in records if len(r.get("conversations") or []) >= 4]
  assert len(texts) >= 6 and len(multi) >= 20
  with pytest.raises(json.JSONDecodeError) as err:
    with open(ds["malformed"]["path"]) as f:
      json.load(f)
  assert (err.value.lineno, err.value.colno) == (ds["malformed"]["line"],
                                                 ds["malformed"]["column"])
  assert Image.open(os.path.join(ds["image_folder"], "photos", "logo_0.png")).mode == "RGBA"
  assert Image.open(os.path.join(ds["image_folder"], "photos", "horse_0.png")).mode == "1"
  assert Image.open(os.path.join(ds["image_folder"], "photos", "camera_0.jpg")).mode == "L"


def test_the_benchmark_files_load_with_the_published_loaders(ds):
  from mqt.benchmarks.pope import load_pope  # pylint: disable=import-outside-toplevel
  from mqt.benchmarks.scienceqa import load_scienceqa  # pylint: disable=import-outside-toplevel
  from mqt.benchmarks.vqav2 import load_vqav2  # pylint: disable=import-outside-toplevel
  pope = load_pope(ds["pope_folder"], ds["pope_image_folder"])
  assert {q.meta["split"] for q in pope} == {"random", "popular", "adversarial"}
  assert len(pope) == 18 and {q.answer for q in pope} == {"yes", "no"}
  sqa = load_scienceqa(ds["scienceqa_problems"], ds["scienceqa_pid_splits"],
                       ds["scienceqa_image_folder"])
  assert len(sqa) == 7  # The problem without an image is not in the IMG subset.
  vqa = load_vqav2(ds["vqav2_questions"], ds["vqav2_annotations"],
                   ds["vqav2_image_folder"])
  assert len(vqa) == 6 and all(len(q.answer) == 10 for q in vqa)
  held = {os.path.abspath(os.path.join(ds["image_folder"], "heldout"))}
  assert all(os.path.dirname(q.image) in held for q in pope + sqa)
  with open(ds["heldout_json"]) as f:
    assert {r["type"] for r in json.load(f)} == set(ds["eval_types"])


def test_tokenizer_command_trains_on_the_user_json(tokenizer):
  from data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.Tokenizer.load(tokenizer)
  assert 300 < tok.vocab_size <= 1024
  text = "a photo of a cat, tinted red"
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(text)) < len(text) // 2  # Merged pieces, not characters.


def test_on_error_fail_names_the_first_broken_record(ds, tokenizer, tmp_path):
  first = ds["first_broken"]
  prep = _run("-m", "data.prepare", "--kind=llava", f"--json={ds['train_json']}",
              f"--image_folder={ds['image_folder']}", "--name=mine",
              f"--data_dir={tmp_path / 'tfds'}")
  _assert_names_record(prep, ds["train_json"], first["index"], first["id"], first["reason"])

  train = _run("train.py", *TINY, f"--workdir={tmp_path / 'run'}", "--config.run_stages=2",
               "--config.eval.ms=()", f"--config.tokenizer_path={tokenizer}",
               "--config.stage2.data.kind=json",
               f"--config.stage2.data.json_path={ds['train_json']}",
               f"--config.stage2.data.image_folder={ds['image_folder']}")
  _assert_names_record(train, ds["train_json"], first["index"], first["id"], first["reason"])


def test_malformed_json_is_one_line_with_file_line_and_column(ds, tokenizer, tmp_path):
  bad = ds["malformed"]
  prep = _run("-m", "data.prepare", "--kind=llava", f"--json={bad['path']}",
              f"--image_folder={ds['image_folder']}", "--name=bad",
              f"--data_dir={tmp_path / 'tfds'}")
  train = _run("train.py", *TINY, f"--workdir={tmp_path / 'run'}", "--config.run_stages=2",
               "--config.eval.ms=()", f"--config.tokenizer_path={tokenizer}",
               f"--config.stage2.data.json_path={bad['path']}",
               f"--config.stage2.data.image_folder={ds['image_folder']}")
  for proc in (prep, train):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    hits = _lines(proc.stdout + proc.stderr, bad["path"])
    assert hits, proc.stderr[-3000:]
    assert re.search(rf"line {bad['line']}\D+{bad['column']}\b", hits[0]), hits[0]


def test_prepare_skips_and_counts_each_reason_once(ds, prepared):
  _, out = prepared
  for reason in user_dataset.PREPARE_REASONS:
    n = ds["expected_skipped"][reason]
    lines = [line for line in out.splitlines() if _reason_named(line, reason)]
    # The count, before any quoted first example ("... (first: <file>: record 12 ...)").
    heads = [line.split("(first")[0].replace(reason, "").replace(ds["root"], "")
             for line in lines]
    assert any(re.search(rf"\b{n}\b", head) for head in heads), (reason, n, lines)
    assert len(lines) <= 2, (reason, lines)  # Per reason, not per record.


def test_skip_run_accounts_for_every_record(ds, trained):
  workdir, log, summary = trained
  stage1, stage2 = summary["stages"]["stage1"]["data"], summary["stages"]["stage2"]["data"]
  assert stage1["total"] == stage1["used"] == ds["n_captions"], stage1
  assert stage1["skipped_total"] == 0 and not _skipped(stage1), stage1
  assert stage2["total"] == ds["n_records"], stage2
  assert stage2["used"] + stage2["skipped_total"] == stage2["total"], stage2
  assert stage2["used"] == ds["n_good"], stage2
  expected = {r: n for r, n in ds["expected_skipped"].items() if n}
  assert _skipped(stage2) == expected, stage2
  # One log line per reason, not per record, not once per grain worker.
  for reason in expected:
    assert len(_lines(log, f"skipping records: {reason}")) == 1, (
        reason, _lines(log, "skipping records"))
  assert len(_lines(log, "skipping records:")) == len(expected)
  # The kinds were inferred from the paths; the built-in data was never prepared.
  assert not os.path.exists(os.path.join(workdir, "data")), os.listdir(workdir)


def test_end_of_run_evaluation_ran_on_the_heldout_file(ds, trained):
  _, log, summary = trained
  ev = summary["eval"]
  assert set(ev["accuracy"]) == set(ds["eval_types"]), ev
  assert ev["count"] == ds["eval_types"], ev["count"]
  for kind, row in ev["accuracy"].items():
    assert set(row) == {"1", "9"} and all(0 <= a <= 1 for a in row.values()), (kind, row)
  assert "held-out teacher-forced answer accuracy per m" in log


def test_prepared_stage_without_eval_data_skips_the_evaluation(ds, tokenizer, prepared,
                                                             tmp_path):
  folder, _ = prepared
  workdir = tmp_path / "tfds_run"
  proc = _run("train.py", *TINY, _epoch(ds), f"--workdir={workdir}", "--config.run_stages=2",
              f"--config.tokenizer_path={tokenizer}",
              f"--config.stage2.data.dataset_dir={folder}", "--config.stage2.data.split=train",
              "--config.data.on_error=skip", "--config.data.overlong=reject")
  log = _ok(proc)
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  data = summary["stages"]["stage2"]["data"]
  # The records that preparing left out still count (the dataset's metadata lists them);
  # the over-long one is judged here.
  assert data["total"] == ds["n_records"], data
  assert data["used"] + data["skipped_total"] == data["total"], data
  assert data["used"] == ds["n_good"], data
  assert _skipped(data) == {r: n for r, n in ds["expected_skipped"].items() if n}, data
  # No held-out data given: the evaluation is skipped, said so, never run on built-in data.
  skip_lines = [line for line in log.splitlines()
                if re.search(r"evaluation", line, re.I) and re.search(r"skip", line, re.I)]
  assert skip_lines, log[-3000:]
  assert "held-out teacher-forced answer accuracy" not in log
  assert "accuracy" not in summary["eval"], summary["eval"]
  assert "eval.data.json_path" in summary["eval"]["skipped"], summary["eval"]
  assert not (workdir / "data").exists()


def test_evaluate_sweeps_the_user_benchmarks(ds, tokenizer, trained):
  workdir, _, _ = trained
  out_dir = os.path.join(workdir, "bench")
  proc = _run("evaluate.py", *TINY, _epoch(ds), f"--workdir={workdir}", *_user_args(ds, tokenizer),
              "--benchmarks=pope,scienceqa,vqav2", "--ms=1,9", f"--out_dir={out_dir}",
              # ScienceQA's prompts (hint, options, instruction) outgrow the 64 trained on.
              "--config.eval.data.max_len=128",
              "--config.eval.generation.batch_size=8",
              "--config.eval.generation.max_new_tokens=4",
              f"--config.eval.benchmarks.pope.folder={ds['pope_folder']}",
              f"--config.eval.benchmarks.pope.image_folder={ds['pope_image_folder']}",
              f"--config.eval.benchmarks.scienceqa.problems={ds['scienceqa_problems']}",
              f"--config.eval.benchmarks.scienceqa.pid_splits={ds['scienceqa_pid_splits']}",
              f"--config.eval.benchmarks.scienceqa.image_folder={ds['scienceqa_image_folder']}",
              f"--config.eval.benchmarks.vqav2.questions={ds['vqav2_questions']}",
              f"--config.eval.benchmarks.vqav2.annotations={ds['vqav2_annotations']}",
              f"--config.eval.benchmarks.vqav2.image_folder={ds['vqav2_image_folder']}")
  _ok(proc)
  with open(os.path.join(out_dir, "results.json")) as f:
    results = json.load(f)
  counts = {"pope": 18, "scienceqa": 7, "vqav2": 6}
  assert results["ms"] == [1, 9] and sorted(results["benchmarks"]) == sorted(counts)
  for m in ("1", "9"):
    for name, n in counts.items():
      metrics = results["per_m"][m]["benchmarks"][name]
      assert metrics["n"] == n and 0 <= metrics[results["headline"][name]] <= 1, metrics
      with open(os.path.join(out_dir, "predictions", f"{name}_m{m}.jsonl")) as f:
        preds = [json.loads(line) for line in f]
      assert len(preds) == n and all(isinstance(p["prediction"], str) for p in preds), preds
  for plot in ("accuracy_vs_m.png", "accuracy_vs_flops.png"):
    assert Image.open(os.path.join(out_dir, plot)).format == "PNG"


def test_predict_answers_about_a_heldout_image(ds, tokenizer, trained):
  workdir, _, _ = trained
  proc = _run("predict.py", *TINY, _epoch(ds), f"--workdir={workdir}", *_user_args(ds, tokenizer),
              "--m=4", f"--image={ds['heldout_image']}", "--prompt=Which digit is this?",
              "--max_new_tokens=4")
  out = _ok(proc)
  assert proc.stdout.strip(), out[-3000:]
