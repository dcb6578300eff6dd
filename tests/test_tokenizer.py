"""Tokenizer loading (where `legacy` comes from) and the tokenizer-training command."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from data import templates
from data import tokenizer as tokenizer_lib
from data.templates import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [templates.SYSTEM, "What is shown? A red circle and a blue square.",
          "Line one\nLine two", "Naïve café 42."] * 20
DEFAULT_LINE = ("no tokenizer_config.json beside it; assuming legacy=True as HF's "
                "LlamaTokenizer does")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  return tokenizer_lib.train_tokenizer(CORPUS, path, vocab_size=320)


def _copy(model_path, folder, config=None) -> str:
  """The model copied into `folder`, with a tokenizer_config.json holding `config` (a dict
  is written as JSON, a str as is, None: no file)."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "tokenizer.model")
  shutil.copy(model_path, path)
  if config is not None:
    text = config if isinstance(config, str) else json.dumps(config)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      f.write(text)
  return path


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == "data.tokenizer" and r.levelno == logging.WARNING]


def test_default_legacy_is_said_once_per_model(model_path, tmp_path, caplog):
  path = _copy(model_path, str(tmp_path / "bare"))
  with caplog.at_level(logging.WARNING, logger="data.tokenizer"):
    tok = tokenizer_lib.Tokenizer.load(path)
    again = tokenizer_lib.Tokenizer.load(path)
  assert (tok.legacy, tok.legacy_source) == (True, "default")
  assert (again.legacy, again.legacy_source) == (True, "default")
  assert _warnings(caplog) == [f"{path}: {DEFAULT_LINE}"]


def test_a_config_without_legacy_is_the_default_too(model_path, tmp_path, caplog):
  for name, config in (("empty", {}), ("null", {"legacy": None})):
    path = _copy(model_path, str(tmp_path / name), config)
    with caplog.at_level(logging.WARNING, logger="data.tokenizer"):
      tok = tokenizer_lib.Tokenizer.load(path)
    assert (tok.legacy, tok.legacy_source) == (True, "default")
    assert _warnings(caplog)[-1] == (f"{path}: the tokenizer_config.json beside it sets no "
                                     f"\"legacy\"; assuming legacy=True as HF's LlamaTokenizer "
                                     f"does")
  assert len(_warnings(caplog)) == 2


def test_legacy_source_names_the_config_or_the_argument(model_path, tmp_path, caplog):
  for value in (False, True):
    path = _copy(model_path, str(tmp_path / str(value)), {"legacy": value})
    with caplog.at_level(logging.WARNING, logger="data.tokenizer"):
      tok = tokenizer_lib.Tokenizer.load(path)
      given = tokenizer_lib.Tokenizer.load(path, legacy=not value)
    assert (tok.legacy, tok.legacy_source) == (value, "tokenizer_config.json")
    assert (given.legacy, given.legacy_source) == (not value, "argument")
  assert _warnings(caplog) == []
  in_memory = tokenizer_lib.Tokenizer(open(model_path, "rb").read(), legacy=False)
  assert (in_memory.legacy, in_memory.legacy_source) == (False, "argument")
  with pytest.raises(ValueError, match="legacy_source='guess'; one of tokenizer_config.json, "):
    tokenizer_lib.Tokenizer(open(model_path, "rb").read(), legacy_source="guess")


@pytest.mark.parametrize("text,message", [
    ('{"legacy": false', "malformed JSON at line 1 column 17: Expecting ',' delimiter; fix it or "
                         "remove the file (legacy then defaults to true)"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"legacy": "no"}', "\"legacy\" must be true, false or null, got 'no'"),
])
def test_bad_tokenizer_config_is_one_line_naming_the_file(model_path, tmp_path, text, message):
  path = _copy(model_path, str(tmp_path), text)
  with pytest.raises(ValueError) as e:
    tokenizer_lib.Tokenizer.load(path)
  assert str(e.value) == f"{tmp_path / 'tokenizer_config.json'}: {message}"
  # An explicit flag does not read the config.
  assert tokenizer_lib.Tokenizer.load(path, legacy=False).legacy_source == "argument"


def test_missing_model_names_the_path(tmp_path):
  missing = str(tmp_path / "nowhere" / "tokenizer.model")
  with pytest.raises(FileNotFoundError, match=f"^tokenizer model {missing} does not exist$"):
    tokenizer_lib.Tokenizer.load(missing)


# ---------------------------------------------------------------------------
# The training command.


def _records(n, offset=0):
  """n LLaVA records, every third text-only, with multi-turn and non-ASCII text."""
  out = []
  for i in range(offset, offset + n):
    image = i % 3 != 0
    first = f"What colour is shape {i}?" + ("\n<image>" if image and i % 2 else "")
    first = ("<image>\n" + first) if image and not i % 2 else first
    conv = [{"from": "human", "value": first},
            {"from": "gpt", "value": f"Shape {i} is red, round and naïve — {i * 7}."}]
    if i % 4 == 0:
      conv += [{"from": "human", "value": "  How many are there?  "},
               {"from": "gpt", "value": "Two 🙂"}]
    out.append({"id": f"r{i}", **({"image": f"{i}.png"} if image else {}),
                "conversations": conv})
  return out


def _run(*args):
  return subprocess.run([sys.executable, "-m", "data.tokenizer", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def jsons(tmp_path_factory):
  folder = tmp_path_factory.mktemp("json")
  paths = []
  for k, records in enumerate((_records(24), _records(12, offset=24))):
    paths.append(str(folder / f"part{k}.json"))
    with open(paths[-1], "w", encoding="utf-8") as f:
      json.dump(records, f, ensure_ascii=False)
  return paths


def _texts(paths):
  """The texts the command should read, counted independently."""
  out = []
  for p in paths:
    for rec in json.load(open(p, encoding="utf-8")):
      out += [t["value"].replace("<image>", "").strip() for t in rec["conversations"]]
  return [t for t in out if t]


def test_command_trains_a_tokenizer_that_encodes_the_data(jsons, tmp_path):
  out = str(tmp_path / "tok" / "tokenizer.model")
  r = _run(f"--json={','.join(jsons)}", f"--out={out}", "--vocab_size=360")
  assert r.returncode == 0, r.stderr
  texts = _texts(jsons)
  assert len(texts) == 36 * 2 + 9 * 2  # 36 records, 9 of them with a second round.
  assert r.stdout.strip().splitlines() == [
      f"wrote {out}: vocab_size 360 (asked 360), {len(texts)} texts from 2 file(s); "
      f"legacy=False in {tmp_path / 'tok' / 'tokenizer_config.json'}"]
  config = json.load(open(tmp_path / "tok" / "tokenizer_config.json"))
  assert config["legacy"] is False and config["tokenizer_class"] == "LlamaTokenizer"
  tok = tokenizer_lib.Tokenizer.load(out)
  assert (tok.vocab_size, tok.legacy, tok.legacy_source) == (360, False, "tokenizer_config.json")
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in texts:
    ids = tok.encode(text)
    assert tok.unk_id not in ids and tok.decode(ids) == text
  records = [r for p in jsons for r in json.load(open(p, encoding="utf-8"))]
  for rec in records:
    for template in ("vicuna_v1", "qa"):
      ids, labels = templates.encode_conversation(rec["conversations"], tok, template,
                                                  "image" in rec, rec["id"])
      answers = len(rec["conversations"]) // 2
      assert [i for i in labels if i != IGNORE_INDEX].count(tok.eos_id) == answers
  # HF's LlamaTokenizer reads the same folder and the same legacy flag.
  transformers = pytest.importorskip("transformers")
  hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert hf.legacy is False
  for text in ("What colour is shape 3?", "Shape 7 is red.</s>Two 🙂"):
    assert hf(text).input_ids == tok.encode(text, bos=True)


def test_command_reports_fewer_pieces_than_asked(jsons, tmp_path):
  out = str(tmp_path / "tokenizer.model")
  r = _run(f"--json={jsons[1]}", f"--out={out}", "--vocab_size=4096", "--legacy")
  assert r.returncode == 0, r.stderr
  real = tokenizer_lib.Tokenizer.load(out).vocab_size
  assert real < 4096
  assert f": vocab_size {real} (asked 4096), {len(_texts(jsons[1:]))} texts from 1 file(s); " \
         f"legacy=True in " in r.stdout
  assert tokenizer_lib.Tokenizer.load(out).legacy_source == "tokenizer_config.json"
  assert tokenizer_lib.Tokenizer.load(out).legacy is True


def test_command_errors_are_one_line(jsons, tmp_path):
  out = str(tmp_path / "tokenizer.model")
  bad = tmp_path / "bad.json"
  bad.write_text('[{"id": "a", "conversations": []},')
  cases = [
      ([f"--json={bad}", f"--out={out}"], f"error: {bad}: malformed JSON at line 1 column "),
      ([f"--json={tmp_path / 'none.json'}", f"--out={out}"],
       f"error: {tmp_path / 'none.json'}: file not found"),
      ([f"--json={jsons[0]}", f"--out={out}", "--vocab_size=270"],
       "error: --vocab_size=270 is too small: the 3 special pieces, the 256 byte-fallback "
       "pieces and the "),
      ([f"--json={jsons[0]}"], "error: --out is required"),
  ]
  for args, message in cases:
    r = _run(*args)
    assert r.returncode == 1, (args, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), (args, r.stderr)
    assert "Traceback" not in r.stderr and not os.path.exists(out)


def test_existing_output_needs_overwrite(jsons, tmp_path):
  out = str(tmp_path / "tokenizer.model")
  info = tokenizer_lib.train_from_json(jsons[1:], out, 400)
  before = open(out, "rb").read()
  r = _run(f"--json={jsons[0]}", f"--out={out}")
  assert r.returncode == 1
  assert r.stderr.strip() == (f"error: {out} exists; pass --overwrite to replace it or choose "
                              f"another --out")
  assert open(out, "rb").read() == before
  os.remove(out)  # The config beside it alone also blocks.
  with pytest.raises(ValueError, match=f"^{info['config']} exists; pass --overwrite"):
    tokenizer_lib.train_from_json(jsons[1:], out, 400)
  again = tokenizer_lib.train_from_json(jsons, out, 400, legacy=True, overwrite=True)
  assert again["num_texts"] == len(_texts(jsons)) and os.path.exists(out)
  assert json.load(open(again["config"]))["legacy"] is True


def test_vocab_size_bound_is_exact(jsons, tmp_path):
  texts = tokenizer_lib.conversation_texts(jsons)
  assert texts == _texts(jsons)
  need = tokenizer_lib.required_vocab_size(texts)
  assert need == 259 + len(set("".join(texts).replace(" ", "▁")) | {"▁"})
  with pytest.raises(ValueError, match=f"^--vocab_size={need - 1} is too small: .* the "
                     f"{need - 259} distinct characters of the texts need at least {need}$"):
    tokenizer_lib.train_from_json(jsons, str(tmp_path / "a.model"), need - 1)
  info = tokenizer_lib.train_from_json(jsons, str(tmp_path / "a.model"), need)
  assert info["vocab_size"] == need and info["num_texts"] == len(texts)


def test_records_without_turns_are_skipped_and_named(tmp_path):
  path = tmp_path / "records.json"
  good = {"id": "ok", "conversations": [{"from": "human", "value": "what is it"},
                                        {"from": "gpt", "value": "a cat"}]}
  path.write_text(json.dumps([good, {"id": "x9", "conversations": "hi"}]))
  with pytest.raises(ValueError, match=f"^{path}: record 1 \\(id .x9.\\): bad_turn: .*; fix or "
                                      "remove the record$"):
    tokenizer_lib.conversation_texts([str(path)])
  skipped = []
  assert tokenizer_lib.conversation_texts([str(path)], skipped) == ["what is it", "a cat"]
  assert len(skipped) == 1 and skipped[0].startswith(f"{path}: record 1 (id 'x9'): bad_turn")
  info = tokenizer_lib.train_from_json([str(path)], str(tmp_path / "t.model"), 400)
  assert info["num_texts"] == 2 and info["skipped"] == skipped
  path.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human",
                                                              "value": "<image>"}]}]))
  with pytest.raises(ValueError, match=f"^{path}: no conversation text to train on$"):
    tokenizer_lib.train_from_json([str(path)], str(tmp_path / "u" / "t.model"), 400)
