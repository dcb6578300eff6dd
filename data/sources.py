"""Random-access record sources: LLaVA JSON + image folder, and TFDS ArrayRecord.

Every source yields raw records of one shape, decoded later in the pipeline:
  {"id": str, "conversations": list of {"from", "value"},
   "image": bytes | None (encoded file), "image_path": str | None,
   "meta": dict of the record's other fields (e.g. "type", "answer")}
A JSON source reads image files lazily (`image_path`); a TFDS source holds the
encoded bytes. `has_image` is a numpy bool array over the records, known
without reading any image, for grouping batches by modality.
"""
import json
import os

import numpy as np

from data import templates


class DataError(ValueError):
  """Bad input data; the message names the file and the sample."""


def _check_record(rec, i, path):
  if not isinstance(rec, dict):
    raise DataError(f"{path}: entry {i} is not an object")
  sid = rec.get("id", f"#{i}")
  conv = rec.get("conversations")
  if not isinstance(conv, list) or not all(
      isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
      for t in conv):
    raise DataError(f"{path}: sample {sid}: 'conversations' must be a list of "
                    f"{{'from': str, 'value': str}}")
  if "image" in rec and not isinstance(rec["image"], str):
    raise DataError(f"{path}: sample {sid}: 'image' must be a relative path string")
  return str(sid)


def load_llava_json(path: str) -> list[dict]:
  """Reads a LLaVA conversation JSON (an array) and checks its structure."""
  try:
    with open(path, encoding="utf-8") as f:
      records = json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
  if not isinstance(records, list):
    raise DataError(f"{path}: expected a JSON array of samples, got {type(records).__name__}")
  seen = {}
  for i, rec in enumerate(records):
    sid = _check_record(rec, i, path)
    if sid in seen:
      raise DataError(f"{path}: sample id {sid} appears twice (entries {seen[sid]} and {i})")
    seen[sid] = i
  return records


class LlavaJsonSource:
  """A LLaVA JSON file and the image folder its relative paths point into."""

  def __init__(self, json_path: str, image_folder: str | None):
    self.json_path = json_path
    self.image_folder = image_folder
    self._records = load_llava_json(json_path)
    self.has_image = np.array(["image" in r for r in self._records], bool)
    if self.has_image.any() and not image_folder:
      raise DataError(f"{json_path}: samples have images but no image folder was given")

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    r = self._records[i]
    path = os.path.join(self.image_folder, r["image"]) if "image" in r else None
    meta = {k: v for k, v in r.items() if k not in ("id", "image", "conversations")}
    return {"id": str(r.get("id", f"#{i}")), "conversations": r["conversations"],
            "image": None, "image_path": path, "meta": meta}


class TfdsSource:
  """A dataset prepared by data/tfds_builders.py (ArrayRecord; no TensorFlow).

  `dataset_dir` is the prepared version folder, e.g.
  `<data_dir>/mqt_synthetic/default/1.0.0` (see `data.tfds_builders.dataset_dir`).
  `turns`: every record's turn count from the metadata (None if it was prepared
  before that was recorded).
  """

  def __init__(self, dataset_dir: str, split: str):
    import tensorflow_datasets as tfds  # Heavy import, only when used.
    if not os.path.isdir(dataset_dir):
      raise DataError(f"{dataset_dir}: no prepared dataset here; run `python -m data.prepare`")
    builder = tfds.builder_from_directory(dataset_dir)
    if split not in builder.info.splits:
      raise DataError(f"{dataset_dir}: no split {split!r}; it has {sorted(builder.info.splits)}")
    self._source = builder.as_data_source(split=split)
    meta = builder.info.metadata or {}
    bits = meta.get("has_image", {}).get(split)
    if bits is None:
      raise DataError(f"{dataset_dir}: no has_image metadata for split {split}; "
                      f"prepare it with `python -m data.prepare`")
    self.has_image = np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[
        :len(self._source)].astype(bool)
    turns = meta.get("turns", {}).get(split)  # Absent in datasets prepared before it.
    self.turns = None if turns is None else unpack_counts(turns)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    r = self._source[i]
    text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else x
    return {"id": text(r["id"]), "conversations": json.loads(text(r["conversations"])),
            "image": r["image"] if r["has_image"] else None,
            "image_path": text(r["image_name"]) or None, "meta": json.loads(text(r["meta"]))}


def pack_bits(flags: np.ndarray) -> str:
  """Bool array -> hex string of packed bits (for TFDS metadata)."""
  return np.packbits(np.asarray(flags, bool)).tobytes().hex()


def pack_counts(counts) -> str:
  """Small non-negative ints (< 65536) -> hex string of little-endian uint16 (for TFDS
  metadata)."""
  counts = np.asarray(counts, np.int64)
  if counts.size and (counts.min() < 0 or counts.max() > 0xFFFF):
    raise DataError(f"counts must lie in [0, 65535]; got {counts.min()}..{counts.max()}")
  return counts.astype("<u2").tobytes().hex()


def unpack_counts(text: str) -> np.ndarray:
  return np.frombuffer(bytes.fromhex(text), "<u2").astype(np.int64)


class RoundsSource:
  """One sample per question-answer round of another source's conversations.

  Sample k of a record is its k-th (human, gpt) pair, with the record's image
  (its `<image>` moved into that question) and id "<id>#<k>"; meta gains
  "round": k. Text-only records split the same way. A record whose turns do not
  pair up (odd count, none) stays one sample, so the pipeline reports it rather
  than this view dropping it. The turn counts come from the source's `turns`
  (TFDS metadata) where it has them; else every record is read once.
  """

  def __init__(self, source):
    self._source = source
    turns = getattr(source, "turns", None)
    if turns is None:
      turns = [len(source[i]["conversations"]) for i in range(len(source))]
    if len(turns) != len(source):
      raise DataError(f"the source has {len(source)} records but {len(turns)} turn counts")
    index = []  # (record, round), round None: the record stays whole.
    for i, n in enumerate(turns):
      index += [(i, k) for k in range(n // 2)] if n and n % 2 == 0 else [(i, None)]
    self._index = index
    self.has_image = np.asarray(source.has_image, bool)[[i for i, _ in index]]

  def __len__(self):
    return len(self._index)

  def __getitem__(self, j):
    i, k = self._index[j]
    r = dict(self._source[i])
    if k is None:
      return r
    if len(r["conversations"]) < 2 * k + 2:
      raise DataError(f"sample {r['id']}: {len(r['conversations'])} turns, but the source's "
                      f"turn counts promised round {k}")
    r["conversations"] = templates.one_round(r["conversations"], k, self.has_image[j])
    r["id"] = f"{r['id']}#{k}"
    r["meta"] = {**(r.get("meta") or {}), "round": k}
    return r
