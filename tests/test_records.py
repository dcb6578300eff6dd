"""data/records.py: one judgment of every record, shared by preparation and training.

A LLaVA JSON holds one record of each unusable kind beside good ones: on_error="fail"
names each (file, index, id, reason); on_error="skip" counts each exactly once under
its reason, and used + skipped = total; preparation finds the same problems.
"""
import io
import json

import numpy as np
import pytest
from PIL import Image

from data import pipeline
from data import prepare
from data import records
from data import templates
from data import tokenizer as tokenizer_lib
from data.sources import DataError, LlavaJsonSource, RoundsSource, TfdsSource

CORPUS = [templates.SYSTEM, "USER: ASSISTANT:", "What is in the picture? A cat on a chair.",
          "How many digits are there? One digit, the number seven."] * 20


def _conv(q, a, image=True):
  return [{"from": "human", "value": ("<image>\n" if image else "") + q},
          {"from": "gpt", "value": a}]


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _noise(n=128, seed=0):
  return np.random.default_rng(seed).integers(0, 255, (n, n, 3), dtype=np.uint8)


def _truncated_jpeg() -> bytes:
  buf = io.BytesIO()
  Image.fromarray(_noise()).save(buf, format="JPEG")
  return buf.getvalue()[:len(buf.getvalue()) * 2 // 3]


def _undecodable_png() -> bytes:
  """A PNG whose header is fine (it opens) but whose pixel data is garbage."""
  data = bytearray(_png(_noise()))
  at = data.find(b"IDAT")
  n = int.from_bytes(data[at - 4:at], "big")
  data[at + 4:at + 4 + n] = np.random.default_rng(1).integers(0, 255, n, np.uint8).tobytes()
  return bytes(data)


IMAGES = {"good.png": lambda: _png(_noise(16)), "zero.png": lambda: b"",
          "truncated.jpg": _truncated_jpeg, "undecodable.png": _undecodable_png,
          "notes.png": lambda: b"these are notes, not a picture"}

# id -> (record without its id, the reason it is unusable).
BROKEN = {
    "missing": ({"image": "nope.png", "conversations": _conv("q?", "a.")}, "missing_image"),
    "zero": ({"image": "zero.png", "conversations": _conv("q?", "a.")}, "empty_image"),
    "truncated": ({"image": "truncated.jpg", "conversations": _conv("q?", "a.")},
                  "corrupt_image"),
    "undecodable": ({"image": "undecodable.png", "conversations": _conv("q?", "a.")},
                    "corrupt_image"),
    "not-an-image": ({"image": "notes.png", "conversations": _conv("q?", "a.")},
                     "corrupt_image"),
    "token-no-image": ({"conversations": _conv("q?", "a.")}, "image_token_without_image"),
    "image-no-token": ({"image": "good.png", "conversations": _conv("q?", "a.", False)
                        + _conv("more?", "yes.", False)}, "image_without_image_token"),
    "two-tokens": ({"image": "good.png", "conversations": _conv("<image> q?", "a.")},
                   "several_image_tokens"),
    "token-later": ({"image": "good.png", "conversations": _conv("q?", "a.") + _conv("r?", "b.")},
                    "several_image_tokens"),
    "not-alternating": ({"conversations": _conv("q?", "a.", False)[:1] * 2 + _conv(
        "q?", "a.", False)[1:]}, "not_alternating"),
    "ends-on-human": ({"conversations": _conv("q?", "a.", False)[:1]}, "not_alternating"),
    "empty-conversations": ({"conversations": []}, "empty_conversations"),
    "no-conversations": ({"image": "good.png"}, "no_conversations"),
    "non-string": ({"conversations": [{"from": "human", "value": 5},
                                      {"from": "gpt", "value": "a."}]}, "bad_turn"),
    "bad-image-field": ({"image": ["good.png"], "conversations": _conv("q?", "a.")},
                        "bad_image_field"),
}
GOOD = [{"id": "good-img", "image": "good.png", "conversations": _conv("What is in it?", "A cat.")},
        {"id": "good-txt", "conversations": _conv("How many digits?", "One.", False)},
        {"id": "long", "image": "good.png", "conversations": _conv("q " * 300, "a.")}]
# Records with no usable id, keyed by their index in `_file`.
NO_ID = {"not-an-object": ("just a string", "not_an_object"),
         "bad-id": ({"id": [1, 2], "conversations": _conv("q?", "a.", False)}, "bad_id")}


def _file(tmp_path, extra=None):
  """Writes images and a JSON of GOOD + one record per kind (+ a duplicate id)."""
  folder = tmp_path / "img"
  folder.mkdir(exist_ok=True)
  for name, make in IMAGES.items():
    (folder / name).write_bytes(make())
  recs = list(GOOD)
  if extra is None:
    recs += [{"id": rid, **rec} for rid, (rec, _) in BROKEN.items()]
    recs += [rec for rec, _ in NO_ID.values()]
    recs.append(dict(GOOD[1], conversations=_conv("Again?", "Yes.", False)))  # duplicate_id
  else:
    recs += extra
  path = tmp_path / "train.json"
  path.write_text(json.dumps(recs))
  return str(path), str(folder), recs


def _expected(recs):
  """index -> (id, reason) of the full file's unusable records."""
  want = {}
  for i, rec in enumerate(recs):
    if isinstance(rec, dict) and str(rec.get("id")) in BROKEN:
      want[i] = (rec["id"], BROKEN[rec["id"]][1])
  n = len(GOOD) + len(BROKEN)
  want[n] = (f"#{n}", "not_an_object")
  want[n + 1] = (f"#{n + 1}", "bad_id")
  want[n + 2] = ("good-txt", "duplicate_id")
  return want


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "t.model"),
                                       vocab_size=300)


def _cfg(tok, **kw):
  base = dict(batch_size=4, max_text_len=64, image_size=16, tokenizer_path=tok, seed=1,
              num_epochs=1, overlong="reject", template="qa")
  base.update(kw)
  return pipeline.PipelineConfig(**base)


@pytest.mark.parametrize("rid", sorted(BROKEN))
def test_fail_names_file_index_id_and_reason(tmp_path, rid):
  rec, reason = BROKEN[rid]
  path, folder, _ = _file(tmp_path, [{"id": rid, **rec}])
  with pytest.raises(DataError) as err:
    LlavaJsonSource(path, folder)
  msg = str(err.value)
  assert msg.startswith(f"{path}: record {len(GOOD)} (id {rid!r}): {reason}: "), msg
  assert "\n" not in msg and "on_error='skip'" in msg


@pytest.mark.parametrize("key", sorted(NO_ID))
def test_fail_names_records_without_a_usable_id(tmp_path, key):
  rec, reason = NO_ID[key]
  path, folder, _ = _file(tmp_path, [rec])
  with pytest.raises(DataError, match=rf"record {len(GOOD)} \(id '#{len(GOOD)}'\): {reason}: "):
    LlavaJsonSource(path, folder)


def test_fail_names_a_duplicate_id_and_the_first_use(tmp_path):
  path, folder, _ = _file(tmp_path, [dict(GOOD[0], conversations=_conv("q?", "a."))])
  with pytest.raises(DataError, match=r"record 3 \(id 'good-img'\): duplicate_id: id "
                                      rf"'good-img' is already used by record 0"):
    LlavaJsonSource(path, folder)


def test_fail_names_an_overlong_sample_when_decoded(tmp_path, tok):
  path, folder, _ = _file(tmp_path, [])
  src = LlavaJsonSource(path, folder)
  with pytest.raises(DataError) as err:
    list(pipeline.make_dataset(src, _cfg(tok, shuffle=False, group_by_modality=False)))
  msg = str(err.value)  # grain adds a note about its traceback; the message is one line.
  assert msg.startswith(f"{path}: record 2 (id 'long'): overlong: ") and "\n" not in msg
  assert "text tokens exceed max_text_len=64 (overlong='reject')" in msg


def test_skip_counts_every_kind_once_and_used_plus_skipped_is_total(tmp_path, tok):
  path, folder, recs = _file(tmp_path)
  src = LlavaJsonSource(path, folder, on_error="skip")
  want = _expected(recs)
  assert {p.index: (p.id, p.reason) for p in src.problems} == want
  assert len(src.problems) == len(want) and src.total == len(recs)
  assert sorted(r["id"] for r in (src[i] for i in range(len(src)))) == [
      "good-img", "good-txt", "long"]
  ledger = records.Ledger(src.total)
  logged = ledger.add_all(src.problems)
  assert sorted(p.reason for p in logged) == sorted({r for _, r in want.values()})
  cfg = _cfg(tok, on_error="skip", num_epochs=3)  # "long" is met three times.
  for batch in pipeline.make_dataset(src, cfg):
    for p in pipeline.batch_problems(batch):
      ledger.add(p)
    bad = batch["skip_reason"] != ""
    np.testing.assert_array_equal(bad, batch["skipped"])
    assert all(m.startswith(f"{path}: record 2 (id 'long'): overlong: ")
               for m in batch["skip_message"][bad])
    assert not batch["text_mask"][bad].any()
  t = ledger.totals()
  counts = {}
  for _, reason in want.values():
    counts[reason] = counts.get(reason, 0) + 1
  counts["overlong"] = 1
  assert t["skipped"] == dict(sorted(counts.items()))
  assert t["skipped_total"] == len(want) + 1 == sum(counts.values())
  assert t["used"] == 2 and t["used"] + t["skipped_total"] == t["total"] == len(recs)
  assert f"records: {len(recs)}, used 2, skipped 19 (" in ledger.summary()


def test_rounds_judge_the_whole_record_before_splitting(tmp_path, tok):
  rec, _ = BROKEN["image-no-token"]
  path, folder, _ = _file(tmp_path, [{"id": "image-no-token", **rec}])
  with pytest.raises(DataError, match=r"\(id 'image-no-token'\): image_without_image_token"):
    RoundsSource(LlavaJsonSource(path, folder))
  src = RoundsSource(LlavaJsonSource(path, folder, on_error="skip"))
  assert [(p.id, p.reason) for p in src.problems] == [("image-no-token",
                                                       "image_without_image_token")]
  ids = [src[i]["id"] for i in range(len(src))]
  assert ids == ["good-img#0", "good-txt#0", "long#0"] and src.total == 4


class _Unjudged:
  """An in-memory source that did not judge its records (as old prepared datasets)."""

  judged = False

  def __init__(self, recs):
    self._recs = recs
    self.has_image = np.array([r.get("image") is not None for r in recs])
    self.name, self.total, self.problems = "mem", len(recs), []

  def __len__(self):
    return len(self._recs)

  def __getitem__(self, i):
    return {**self._recs[i], "meta": {}, "image_path": None}


def test_rounds_judge_records_of_an_unjudged_source():
  recs = [{"id": "ok", "image": b"x", "conversations": _conv("q?", "a.") + _conv(
              "r?", "b.", False)},
          {"id": "hidden", "image": b"x", "conversations": _conv("q?", "a.", False) * 2}]
  src = RoundsSource(_Unjudged(recs))
  assert [src[i]["id"] for i in range(len(src))] == ["ok#0", "ok#1"]
  assert [(p.index, p.id, p.reason) for p in src.problems] == [
      (1, "hidden", "image_without_image_token")]
  assert src.problems[0].message.startswith("mem: record 1 (id 'hidden'): ")


def test_preparation_and_the_json_source_find_the_same_problems(tmp_path, capsys):
  path, folder, recs = _file(tmp_path)
  json_src = LlavaJsonSource(path, folder, on_error="skip")
  out = prepare.prepare_llava(path, folder, "broken", str(tmp_path / "tfds"), on_error="skip")
  tfds_src = TfdsSource(out, "train")
  assert tfds_src.problems == json_src.problems
  assert tfds_src.total == json_src.total == len(recs) and len(tfds_src) == len(json_src) == 3
  lines = [l for l in capsys.readouterr().out.splitlines() if "skipped" in l and "first:" in l]
  assert len(lines) == len({p.reason for p in json_src.problems})  # One line per reason.
  assert f"{path}: skipped 3 record(s): corrupt_image (first: {path}: record 5 " in "\n".join(
      lines)
  with pytest.raises(DataError, match=r"record 3 \(id 'missing'\): missing_image"):
    prepare.prepare_llava(path, folder, "strict", str(tmp_path / "tfds"))


def test_a_truncated_jpeg_passes_pil_verify_but_not_the_judgment():
  data = _truncated_jpeg()
  Image.open(io.BytesIO(data)).verify()  # What preparation used to accept.
  reason, text = records.image_problem(data, "t.jpg")
  assert reason == "corrupt_image" and "t.jpg" in text and "truncated" in text


def test_image_reasons(tmp_path):
  (tmp_path / "dir.png").mkdir()
  assert records.image_problem(str(tmp_path / "nope.png"))[0] == "missing_image"
  assert records.image_problem(str(tmp_path / "dir.png"))[0] == "unreadable_image"
  assert records.image_problem(b"")[0] == "empty_image"
  assert records.image_problem(b"GIF89a...")[0] == "corrupt_image"
  assert records.image_problem(_png(_noise(8))) is None


def test_every_reason_has_a_one_line_description():
  assert len(records.REASONS) >= 17
  for key, text in records.REASONS.items():
    assert key == key.lower() and " " not in key and text and "\n" not in text
  with pytest.raises(ValueError, match="unknown reason 'nope'"):
    records.make_problem("f", 0, "x", "nope", "why")


def test_ledger_counts_each_record_once_per_reason_and_survives_json():
  p = lambda i, rid, reason: records.make_problem("f.json", i, rid, reason, "why")
  ledger = records.Ledger(10)
  assert ledger.add(p(1, "a", "overlong")) is True
  assert ledger.add(p(1, "a", "overlong")) is False  # A later epoch: not counted again.
  assert ledger.add(p(2, "b", "overlong")) is False  # Known reason: no new log line.
  assert ledger.add(p(3, "b", "duplicate_id")) is True  # Same id, another record.
  assert ledger.add(p(1, "a", "untemplatable")) is True  # Another round of record 1.
  want = {"total": 10, "used": 7, "skipped": {"duplicate_id": 1, "overlong": 2,
                                              "untemplatable": 1}, "skipped_total": 3}
  assert ledger.totals() == want
  restored = records.Ledger.from_state(json.loads(json.dumps(ledger.state())))
  assert restored.totals() == want
  assert restored.add(p(2, "b", "overlong")) is False and restored.totals() == want
  assert records.skip_line(p(1, "a", "overlong")) == (
      "skipping records: overlong (first: f.json: record 1 (id 'a'): overlong: why)")


def test_old_prepared_datasets_give_reason_unknown():
  from data import sources  # pylint: disable=import-outside-toplevel
  old = sources._stored_problem(["gone", "sample gone: image x.png is missing"], "ds")
  assert old == records.Problem(-1, "gone", "unknown", "ds: sample gone: image x.png is missing")
  new = sources._stored_problem({"index": 4, "id": "a", "reason": "empty_image",
                                 "message": "m"}, "ds")
  assert new == records.Problem(4, "a", "empty_image", "m")


def test_malformed_json_is_one_error_even_when_skipping(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[{"id": "a", "conversations": []},\n {"id": "b", "conversations": [}]')
  with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2 column \d+"):
    LlavaJsonSource(str(path), None, on_error="skip")
  path.write_text('\n  {"id": "a"}')
  with pytest.raises(DataError, match=r"broken.json: line 2 column 3: the top level is a JSON "
                                      r"dict; expected an array of records"):
    LlavaJsonSource(str(path), None, on_error="skip")
  path.write_bytes(b'[\n {"id": "caf\xe9"}]')
  with pytest.raises(DataError, match=r"not UTF-8 text at line 2 column 13"):
    LlavaJsonSource(str(path), None, on_error="skip")


def test_progress_line_per_thousand_records(tmp_path, capsys):
  recs = [{"id": i, "conversations": _conv("q?", "a.", False)} for i in range(1500)]
  path = tmp_path / "many.json"
  path.write_text(json.dumps(recs))
  src = LlavaJsonSource(str(path), None)
  assert len(src) == 1500 and src[3]["id"] == "3"
  lines = [l for l in capsys.readouterr().out.splitlines() if "judged" in l]
  assert lines == [f"{path}: judged 1000/1500 records, 0 unusable so far",
                   f"{path}: judged 1500/1500 records, 0 unusable so far"]


def test_text_problems_are_found_up_front_and_match_the_rows(tmp_path, tok, capsys):
  multi = {"id": "long-rounds", "conversations": _conv("q?", "a.", False)
           + _conv("q " * 300, "b.", False) + _conv("r " * 300, "c.", False)}
  path, folder, _ = _file(tmp_path, [multi])
  src = RoundsSource(LlavaJsonSource(path, folder))
  cfg = _cfg(tok, on_error="skip", num_epochs=1)
  found = pipeline.text_problems(src, cfg)
  assert [(p.index, p.id, p.reason) for p in found] == [(2, "long", "overlong"),
                                                         (3, "long-rounds", "overlong")]
  assert found[1].message.startswith(f"{path}: record 3 (id 'long-rounds'): overlong: round 1: ")
  rows = [p for b in pipeline.make_dataset(src, cfg) for p in pipeline.batch_problems(b)]
  assert sorted(rows) == sorted([found[0]] + [found[1]] + [  # One row per failing round.
      found[1]._replace(message=found[1].message.replace("round 1: ", "round 2: "))])
  ledger = records.Ledger(src.total)
  ledger.add_all(found)
  before = ledger.totals()
  assert ledger.add_all(rows) == [] and ledger.totals() == before  # Counted once.
  assert before["skipped"] == {"overlong": 2} and before["used"] == 2
  assert "tokenized" not in capsys.readouterr().out  # Few samples: no progress lines.


def test_a_source_with_no_usable_record_is_one_error(tmp_path, tok):
  path, folder, _ = _file(tmp_path, [])
  recs = [{"id": "x", "conversations": []}]
  (tmp_path / "train.json").write_text(json.dumps(recs))
  src = LlavaJsonSource(path, folder, on_error="skip")
  assert len(src) == 0 and src.total == 1
  with pytest.raises(DataError, match=rf"^{path}: none of its 1 records is usable; first: "
                                      rf"{path}: record 0 \(id 'x'\): empty_conversations"):
    pipeline.make_dataset(src, _cfg(tok))
