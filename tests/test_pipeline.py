"""The grain pipeline on real images: exact resume, process shards, TFDS, bad input."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from data import pipeline
from data import prepare
from data import templates
from data import tokenizer as tokenizer_lib
from data.sources import DataError, LlavaJsonSource, RoundsSource, TfdsSource
from data.templates import IMAGE_TOKEN_ID

CORPUS = [
    templates.SYSTEM, "USER: ASSISTANT:",
    "What is in the picture? A cat sitting on a chair.",
    "Describe the image. An astronaut in a white suit with a flag.",
    "How many digits are there? One digit, the number seven.",
    "What color is the cup? The coffee cup is white and brown.",
] * 20


def _photos():
  import skimage.data
  from sklearn.datasets import load_digits
  photos = {"astronaut.jpg": skimage.data.astronaut(), "coffee.jpg": skimage.data.coffee(),
            "chelsea.png": skimage.data.chelsea(), "camera.png": skimage.data.camera(),
            "rocket.jpg": skimage.data.rocket()}
  digits = load_digits()
  for i in range(6):
    photos[f"digits/{i}.png"] = (digits.images[i] * 16).astype(np.uint8).repeat(4, 0).repeat(4, 1)
  return photos


def _conv(q, a, image=True):
  return [{"from": "human", "value": ("<image>\n" if image else "") + q},
          {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava")
  images = root / "images"
  records = []
  for i, (name, array) in enumerate(_photos().items()):
    path = images / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    records.append({"id": f"img{i}", "image": name, "conversations": _conv(
        "What is in the picture?", f"Picture {i}: a photo.")})
  for i in range(3):
    records.append({"id": f"txt{i}", "conversations": _conv("How many digits?", "One.", False)})
  (root / "data.json").write_text(json.dumps(records))
  tok = tokenizer_lib.train_tokenizer(CORPUS, str(root / "tok" / "tokenizer.model"), vocab_size=400)
  return root, tok, records


def _cfg(tok, **kw):
  base = dict(batch_size=4, max_text_len=128, image_size=32, tokenizer_path=tok, seed=3,
              num_epochs=2)
  base.update(kw)
  return pipeline.PipelineConfig(**base)


def _source(root):
  return LlavaJsonSource(str(root / "data.json"), str(root / "images"))


def _same(a, b):
  for k in ("images", "input_ids", "text_mask", "labels", "skipped", "empty"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert list(a["sample_id"]) == list(b["sample_id"])


def test_resume_from_state_gives_the_same_batches(llava_dir):
  root, tok, _ = llava_dir
  ds = pipeline.make_dataset(_source(root), _cfg(tok))
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  rest = list(it)
  it2 = iter(ds)
  it2.set_state(json.loads(json.dumps(state)))  # States survive JSON (checkpoints).
  rest2 = list(it2)
  assert len(rest) == len(rest2) > 0
  for a, b in zip(rest, rest2):
    _same(a, b)


def test_workers_give_the_same_batches(llava_dir):
  root, tok, _ = llava_dir
  plain = list(pipeline.make_dataset(_source(root), _cfg(tok)))
  workers = list(pipeline.make_dataset(_source(root), _cfg(tok, worker_count=2)))
  assert len(plain) == len(workers)
  for a, b in zip(plain, workers):
    _same(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_started_at_step_k_continues_the_uninterrupted_one(llava_dir, workers):
  """The trainer resumes with start_step when worker_count changed (grain's own state
  differs with and without worker processes)."""
  import itertools  # pylint: disable=import-outside-toplevel
  root, tok, _ = llava_dir
  cfg = _cfg(tok, worker_count=workers)
  full = list(pipeline.make_dataset(_source(root), cfg))
  k = 3
  started = pipeline.make_dataset(_source(root), cfg, start_step=k)
  rest = list(started)
  assert len(rest) == len(full) - k > 2
  for a, b in zip(full[k:], rest):
    _same(a, b)
  it = iter(started)  # Its own state round-trips too (counted from start_step).
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  it2 = iter(started)
  it2.set_state(state)
  after = list(it2)
  assert len(after) == len(rest) - 1
  for a, b in zip(rest[1:], after):
    _same(a, b)
  if workers:
    return  # The endless form below is the same grain graph; workers add only time.
  endless = _cfg(tok, num_epochs=None)
  head = list(itertools.islice(iter(pipeline.make_dataset(_source(root), endless)), k + 4))
  tail = list(itertools.islice(iter(pipeline.make_dataset(_source(root), endless,
                                                          start_step=k)), 4))
  for a, b in zip(head[k:], tail):
    _same(a, b)
  assert len(tail) == 4
  with pytest.raises(ValueError, match="start_step=-1"):
    pipeline.make_dataset(_source(root), cfg, start_step=-1)


def test_two_processes_get_disjoint_shards_that_cover(llava_dir):
  root, tok, records = llava_dir
  seen = []
  for p in range(2):
    cfg = _cfg(tok, process_index=p, process_count=2, num_epochs=1)
    ids = [i for b in pipeline.make_dataset(_source(root), cfg) for i in b["sample_id"] if i]
    assert len(ids) == len(set(ids))
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {r["id"] for r in records}


def test_batches_are_grouped_by_modality_and_lose_nothing(llava_dir):
  root, tok, records = llava_dir
  batches = list(pipeline.make_dataset(_source(root), _cfg(tok, num_epochs=1)))
  ids = [i for b in batches for i in b["sample_id"] if i]
  assert sorted(ids) == sorted(r["id"] for r in records)
  for b in batches:
    rows = ~b["empty"]
    has_image = (b["input_ids"] == templates.IMAGE_TOKEN_ID).any(axis=1)[rows]
    assert has_image.all() or not has_image.any()
    assert b["input_ids"].shape == (4, 128) and b["images"].shape == (4, 32, 32, 3)


def test_tfds_builder_to_model_ready_batches(llava_dir, tmp_path):
  import jax
  from flax import linen as nn
  from configs import tiny
  from mqt.model import MQTLLaVA, ModelConfig, next_token_loss
  root, tok, records = llava_dir
  out = prepare.prepare_llava(str(root / "data.json"), str(root / "images"), "mini",
                              str(tmp_path))
  src = TfdsSource(out, "train")
  assert len(src) == len(records) and src.has_image.sum() == len(records) - 3
  json_batches = list(pipeline.make_dataset(_source(root), _cfg(tok, image_size=64)))
  tfds_batches = list(pipeline.make_dataset(src, _cfg(tok, image_size=64)))
  for a, b in zip(json_batches, tfds_batches):
    _same(a, b)
  model_config = tiny.get_config().model
  model_config.query.spatial_init_gap = 0.0  # 64 px images: 2x2 patches for 9 latents.
  cfg = ModelConfig.from_config(model_config)
  model = MQTLLaVA(cfg)
  batch = next(b for b in tfds_batches if (b["input_ids"] == -200).any())
  ids = np.minimum(batch["input_ids"], cfg.llm.vocab_size - 1)  # The tiny vocab is smaller.
  ids[batch["input_ids"] == -200] = -200
  params = nn.unbox(model.init(jax.random.key(0), batch["images"], ids, batch["text_mask"], 16))
  logits, layout = model.apply(params, batch["images"], ids, batch["text_mask"], 8)
  loss, aux = next_token_loss(logits, layout, np.minimum(batch["labels"], cfg.llm.vocab_size - 1))
  assert np.isfinite(float(loss)) and int(aux["tokens"]) > 0


# ---------------------------------------------------------------------------
# Bad input: fail naming the sample, or skip and count.

def _write(tmp_path, records, images=("good.png",)):
  (tmp_path / "img").mkdir(exist_ok=True)
  for name in images:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / name)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(records))
  return str(path), str(tmp_path / "img")


BAD = {
    "missing image": ({"image": "nope.png", "conversations": _conv("q?", "a.")},
                      "missing_image"),
    "corrupt image": ({"image": "corrupt.png", "conversations": _conv("q?", "a.")},
                      "corrupt_image"),
    "no <image> with an image": ({"image": "good.png", "conversations": _conv("q?", "a.", False)},
                                 "image_without_image_token"),
    "<image> without image": ({"conversations": _conv("q?", "a.")}, "image_token_without_image"),
    "turns do not alternate": ({"image": "good.png", "conversations": _conv("q?", "a.") + [
        {"from": "gpt", "value": "again"}]}, "not_alternating"),
    "too long": ({"image": "good.png", "conversations": _conv("q " * 300, "a.")}, "overlong"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_fails_naming_it(llava_dir, tmp_path, case):
  _, tok, _ = llava_dir
  record, reason = BAD[case]
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
  path, folder = _write(tmp_path, [{"id": "fine", "image": "good.png",
                                    "conversations": _conv("q?", "a.")},
                                   {"id": "bad", **record}])
  cfg = _cfg(tok, overlong="reject", num_epochs=1, shuffle=False, group_by_modality=False)
  with pytest.raises(DataError) as err:
    list(pipeline.make_dataset(LlavaJsonSource(path, folder), cfg))
  assert str(err.value).startswith(f"{path}: record 1 (id 'bad'): {reason}: ")
  src = LlavaJsonSource(path, folder, on_error="skip")
  skip = list(pipeline.make_dataset(src, _cfg(tok, overlong="reject", num_epochs=1,
                                              on_error="skip")))
  found = src.problems + [p for b in skip for p in pipeline.batch_problems(b)]
  assert [(p.index, p.id, p.reason) for p in found] == [(1, "bad", reason)]
  assert sum(int(b["skipped"].sum()) for b in skip) == (reason == "overlong")
  assert sum(int(b["text_mask"].any(axis=1).sum()) for b in skip) == 1  # "fine" survives.


def test_truncation_is_counted(llava_dir, tmp_path):
  _, tok, _ = llava_dir
  path, folder = _write(tmp_path, [{"id": "long", "image": "good.png",
                                    "conversations": _conv("q " * 300, "a.")}])
  batches = list(pipeline.make_dataset(LlavaJsonSource(path, folder),
                                       _cfg(tok, num_epochs=1)))
  assert sum(int(b["truncated"].sum()) for b in batches) == 1
  assert batches[0]["text_mask"][~batches[0]["empty"]].all()


def test_malformed_json_names_the_file_and_place(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[{"id": "a", "conversations": []},\n {"id": "b", "conversations": [}]')
  with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2"):
    LlavaJsonSource(str(path), str(tmp_path))
  path.write_text(json.dumps([{"id": "x", "conversations": "hello"}]))
  with pytest.raises(DataError, match=r"record 0 \(id 'x'\): bad_turn: 'conversations' is a "
                                      r"str, not a list"):
    LlavaJsonSource(str(path), str(tmp_path))
  path.write_text(json.dumps([{"id": "x", "conversations": _conv("q", "a", False)}] * 2))
  with pytest.raises(DataError, match=r"record 1 \(id 'x'\): duplicate_id: id 'x' is already "
                                      r"used by record 0"):
    LlavaJsonSource(str(path), str(tmp_path))


def test_tfds_prepare_skips_and_counts_missing_images(llava_dir, tmp_path):
  path, folder = _write(tmp_path, [
      {"id": "ok", "image": "good.png", "conversations": _conv("q?", "a.")},
      {"id": "gone", "image": "missing.png", "conversations": _conv("q?", "a.")}])
  with pytest.raises(DataError, match=r"record 1 \(id 'gone'\): missing_image: no image file "
                                      r".*missing.png"):
    prepare.prepare_llava(path, folder, "strict", str(tmp_path / "tfds"))
  out = prepare.prepare_llava(path, folder, "lenient", str(tmp_path / "tfds"), on_error="skip")
  import tensorflow_datasets as tfds
  meta = tfds.builder_from_directory(out).info.metadata
  assert [(s["index"], s["id"], s["reason"]) for s in meta["skipped"]["train"]] == [
      (1, "gone", "missing_image")]
  src = TfdsSource(out, "train")
  assert len(src) == 1 and src.total == 2 and src.judged
  assert [(p.id, p.reason) for p in src.problems] == [("gone", "missing_image")]


def test_builtin_set_from_another_generator_version_is_refused(tmp_path):
  """A data_dir prepared by an older data/synthetic/ (other DATA_VERSION) is not
  silently reused: the error names the folder and both settings."""
  from data import synthetic
  root = prepare.builtin_root(str(tmp_path))
  os.makedirs(root)
  open(os.path.join(root, "dataset_info.json"), "w").close()
  sizes = {"captions": 4, "instruct": 4, "eval": 6}
  with open(os.path.join(str(tmp_path), prepare.SYNTHETIC + "_settings.json"), "w") as f:
    json.dump({"seed": 0, "image_size": 72, "sizes": sizes,
               "version": synthetic.DATA_VERSION - 1}, f)
  with pytest.raises(DataError, match=rf"{root} holds the built-in set prepared with "
                     rf".*'version': {synthetic.DATA_VERSION - 1}.*'version': "
                     rf"{synthetic.DATA_VERSION}"):
    prepare.ensure_builtin(str(tmp_path), seed=0, image_size=72, sizes=sizes)


def test_concurrent_preparations_of_one_data_dir_take_turns(tmp_path, monkeypatch):
  """ensure_builtin holds a file lock in data_dir: four threads preparing at once
  run their preparations one after another, never two at a time."""
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  inside, seen = [0], []

  def fake_prepare(data_dir, *args):
    inside[0] += 1
    seen.append(inside[0])
    time.sleep(0.05)  # Long enough for the other threads to arrive.
    inside[0] -= 1
    return data_dir

  monkeypatch.setattr(prepare, "_ensure_builtin", fake_prepare)
  threads = [threading.Thread(target=prepare.ensure_builtin, args=(str(tmp_path / "data"),))
             for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert seen == [1, 1, 1, 1]


def test_rounds_source_gives_one_sample_per_round_and_loses_nothing(llava_dir):
  root, tok, records = llava_dir
  multi = [dict(records[0], id="m0", conversations=_conv("What is in the picture?", "A photo.")
                + _conv("Is it big?", "Yes.", False) + _conv("Colour?", "Grey.", False)),
           dict(records[-1], id="t0", conversations=_conv("One?", "Two.", False) * 2),
           dict(records[1], id="odd", conversations=_conv("Q?", "A.")[:1])]
  (root / "multi.json").write_text(json.dumps(multi))
  with pytest.raises(DataError, match=r"record 2 \(id 'odd'\): not_alternating"):
    LlavaJsonSource(str(root / "multi.json"), str(root / "images"))
  base = LlavaJsonSource(str(root / "multi.json"), str(root / "images"), on_error="skip")
  src = RoundsSource(base)
  assert [src[i]["id"] for i in range(len(src))] == ["m0#0", "m0#1", "m0#2", "t0#0", "t0#1"]
  # The unpaired record is judged whole up front: counted, not dropped.
  assert [(p.id, p.reason) for p in src.problems] == [("odd", "not_alternating")]
  assert src.total == 3
  np.testing.assert_array_equal(src.has_image, [True, True, True, False, False])
  assert src[1]["conversations"] == _conv("Is it big?", "Yes.")  # The image moved in.
  assert src[2]["image_path"] == base[0]["image_path"] and src[2]["meta"]["round"] == 2
  assert src[4]["conversations"] == _conv("One?", "Two.", False)
  batches = list(pipeline.make_dataset(src, _cfg(tok, batch_size=6, num_epochs=1,
                                                  shuffle=False, group_by_modality=False,
                                                  template="qa", on_error="skip")))
  b = batches[0]
  assert list(b["sample_id"]) == ["m0#0", "m0#1", "m0#2", "t0#0", "t0#1", ""]
  assert list(b["record"]) == [(0, "m0")] * 3 + [(1, "t0")] * 2 + [None]
  np.testing.assert_array_equal(b["skipped"], [False] * 6)
  for r in range(5):  # One answer per row, and the image (if any) after its question.
    ids = b["input_ids"][r][b["text_mask"][r]]
    assert (b["labels"][r] == tokenizer_lib.Tokenizer.load(tok).eos_id).sum() == 1
    assert (ids == IMAGE_TOKEN_ID).sum() == (1 if r < 3 else 0)


class _Counting:
  """A source proxy that counts record reads; `turns` hidden when `hide_turns`."""

  def __init__(self, source, hide_turns=False):
    self._source, self.reads, self.has_image = source, 0, source.has_image
    self.judged = source.judged  # Judged at preparation: RoundsSource need not read them.
    if not hide_turns:
      self.turns = source.turns

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    self.reads += 1
    return self._source[i]


def test_tfds_turn_counts_split_rounds_without_reading_records(llava_dir, tmp_path):
  root, _, records = llava_dir
  multi = [dict(records[0], id="m0", conversations=_conv("What is in the picture?", "A photo.")
                + _conv("Is it big?", "Yes.", False)),
           dict(records[-1], id="t0", conversations=_conv("One?", "Two.", False) * 3),
           dict(records[1], id="odd", conversations=_conv("Q?", "A.")[:1])]
  (root / "multi_tfds.json").write_text(json.dumps(multi))
  out = prepare.prepare_llava(str(root / "multi_tfds.json"), str(root / "images"), "rounds",
                              str(tmp_path), on_error="skip")
  src = TfdsSource(out, "train")
  np.testing.assert_array_equal(src.turns, [4, 6])
  assert [(p.index, p.id, p.reason) for p in src.problems] == [(2, "odd", "not_alternating")]
  fast, slow = _Counting(src), _Counting(src, hide_turns=True)
  a, b = RoundsSource(fast), RoundsSource(slow)
  assert fast.reads == 0 and slow.reads == 2  # Metadata instead of one read per record.
  assert [a[i]["id"] for i in range(len(a))] == [b[i]["id"] for i in range(len(b))] == [
      "m0#0", "m0#1", "t0#0", "t0#1", "t0#2"]
  np.testing.assert_array_equal(a.has_image, b.has_image)
  fast.turns = np.array([4, 8])  # Counts that promise more than a record holds.
  with pytest.raises(DataError, match="record 1 \\(id 't0'\\): 6 turns, but the source's "
                     "turn counts promised round 3"):
    RoundsSource(fast)[5]
  fast.turns = np.array([4])
  with pytest.raises(DataError, match="2 records but 1 turn counts"):
    RoundsSource(fast)
