"""Random-access record sources: LLaVA JSON + image folder, and TFDS ArrayRecord.

Every source yields raw records of one shape, decoded later in the pipeline:
  {"id": str, "conversations": list of {"from", "value"},
   "image": bytes | None (encoded file), "image_path": str | None,
   "meta": dict of the record's other fields (e.g. "type", "answer"),
   "index": int (the record's position in its file or prepared dataset),
   "record_id": str (the id of the whole record; "id" differs for rounds)}
A JSON source reads image files lazily (`image_path`); a TFDS source holds the
encoded bytes. `has_image` is a numpy bool array over the records, known
without reading any image, for grouping batches by modality.

Every source judges its records up front with data/records.py (the judgment
preparation uses too) and serves only usable ones: `problems` lists the
unusable records (`records.Problem`), `total` counts the records of the file
(usable or not), `name` names it in messages. Nothing vanishes: the trainer
counts `problems` in a `records.Ledger`.
"""
import json

import numpy as np

from data import paths
from data import records as records_lib
from data import templates
from data.records import DataError  # Also re-exported: data.sources.DataError.

ON_ERROR = ("fail", "skip")


def _line_col(text: str, pos: int) -> tuple[int, int]:
  """1-based line and column of character `pos` of `text`."""
  line = text.count("\n", 0, pos) + 1
  return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def load_llava_json(path: str) -> list:
  """Parses a LLaVA conversation JSON: the array of records, not yet judged.

  Raises:
    DataError: a missing or unreadable file, text that is not UTF-8 or not JSON, or a
      top level that is not an array; one line naming the file, line and column.
  """
  try:
    raw = paths.read_bytes(path)
  except FileNotFoundError:
    raise DataError(f"{path}: file not found; check the JSON path") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    before = raw[:e.start].decode("utf-8", "replace")
    line, col = _line_col(before, len(before))
    raise DataError(f"{path}: not UTF-8 text at line {line} column {col} (byte {e.start}); "
                    f"save the file as UTF-8") from None
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                    f"{e.msg}") from None
  if not isinstance(records, list):
    line, col = _line_col(text, len(text) - len(text.lstrip()))
    raise DataError(f"{path}: line {line} column {col}: the top level is a JSON "
                    f"{type(records).__name__}; expected an array of records")
  return records


class LlavaJsonSource:
  """A LLaVA JSON file and the image folder its relative paths point into.

  The file is parsed and every record judged at construction (structure, and its
  image decoded fully, as preparation does); only usable records are served.

  Args:
    json_path: the conversation JSON (an array of records).
    image_folder: where the records' relative image paths point.
    on_error: "fail": the first unusable record raises DataError naming it;
      "skip": unusable records are left out and listed in `problems`.
  """

  judged = True  # Records were judged whole (RoundsSource need not).

  def __init__(self, json_path: str, image_folder: str | None, on_error: str = "fail"):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR}")
    self.json_path = self.name = json_path
    self.image_folder = image_folder
    raw = load_llava_json(json_path)
    self.total = len(raw)
    with_image = next((i for i, r in enumerate(raw) if isinstance(r, dict) and "image" in r),
                      None)
    if with_image is not None and not image_folder:
      raise DataError(f"{json_path}: record {with_image} has an image but no image folder was "
                      f"given; set the image folder")
    keep, self.problems = records_lib.judge_records(raw, json_path, image_folder, on_error)
    self._index = np.asarray(keep, np.int64)
    self._records = [raw[i] for i in keep]
    self.has_image = np.array(["image" in r for r in self._records], bool)
    self.turns = np.array([len(r["conversations"]) for r in self._records], np.int64)

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    r = self._records[i]
    index = int(self._index[i])
    path = paths.join(self.image_folder, r["image"]) if "image" in r else None
    meta = {k: v for k, v in r.items() if k not in ("id", "image", "conversations")}
    rid = records_lib.record_id(r, index)[0]
    return {"id": rid, "conversations": r["conversations"], "image": None, "image_path": path,
            "meta": meta, "index": index, "record_id": rid}


class TfdsSource:
  """A dataset prepared by data/tfds_builders.py (ArrayRecord; no TensorFlow).

  `dataset_dir` is the prepared version folder, e.g.
  `<data_dir>/mqt_synthetic/default/1.0.0` (see `data.tfds_builders.dataset_dir`).
  `turns`: every record's turn count from the metadata (None if it was prepared
  before that was recorded). `problems`: the records preparation left out
  (datasets prepared before reasons were recorded give reason "unknown");
  `total`: the records of the prepared file, usable or not. `judged`: the records
  were judged whole at preparation (by data/records.py, or generated by
  data/synthetic/).
  """

  def __init__(self, dataset_dir: str, split: str):
    import tensorflow_datasets as tfds  # Heavy import, only when used.
    if not paths.isdir(dataset_dir):
      raise DataError(f"{dataset_dir}: no prepared dataset here; run `python -m data.prepare`")
    builder = tfds.builder_from_directory(dataset_dir)
    if split not in builder.info.splits:
      raise DataError(f"{dataset_dir}: no split {split!r}; it has {sorted(builder.info.splits)}")
    self.name = f"{dataset_dir} [{split}]"
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
    self.problems = [_stored_problem(p, dataset_dir) for p in
                     meta.get("skipped", {}).get(split, [])]
    self.total = int(meta.get("total", {}).get(split, len(self._source) + len(self.problems)))
    self.judged = bool(meta.get("judged", {}).get(split)) or builder.name == "mqt_synthetic"

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    r = self._source[i]
    text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else x
    rid = text(r["id"])
    return {"id": rid, "conversations": json.loads(text(r["conversations"])),
            "image": r["image"] if r["has_image"] else None,
            "image_path": text(r["image_name"]) or None, "meta": json.loads(text(r["meta"])),
            "index": int(i), "record_id": rid}


def _stored_problem(entry, where: str) -> records_lib.Problem:
  """A "skipped" metadata entry -> Problem: {"index", "id", "reason", "message"}, or the
  [id, message] pair of datasets prepared before reasons were recorded ("unknown")."""
  if isinstance(entry, dict):
    reason = entry["reason"] if entry["reason"] in records_lib.REASONS else "unknown"
    return records_lib.Problem(int(entry["index"]), str(entry["id"]), reason,
                               str(entry["message"]))
  rid, message = entry
  return records_lib.Problem(-1, str(rid), "unknown", f"{where}: {message}")


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
  "round": k. Text-only records split the same way. Records are judged whole
  before they are split (a record with an image but no `<image>` is unusable,
  though each round would get one): sources that judged their records already
  (`judged`) are trusted, others are read once and their structure judged here;
  an unusable record gives no rounds and joins `problems`. `total` stays the
  source's record count (a record, not a round, is the unit). The turn counts
  come from the source's `turns` where it has them; else every record is read once.
  """

  def __init__(self, source):
    self._source = source
    self.name = getattr(source, "name", "data")
    self.total = getattr(source, "total", len(source))
    self.problems = list(getattr(source, "problems", []))
    self.judged = True
    turns = getattr(source, "turns", None)
    has_image = np.asarray(source.has_image, bool)
    bad = set()
    judged = getattr(source, "judged", False)
    if turns is None or not judged:  # Read every record once.
      turns = []
      for i in range(len(source)):
        r = source[i]
        turns.append(len(r["conversations"]))
        found = None if judged else records_lib.conversation_problem(r["conversations"],
                                                                     bool(has_image[i]))
        if found:
          bad.add(i)
          self.problems.append(records_lib.make_problem(
              self.name, r.get("index", i), r.get("record_id", r["id"]), *found))
    if len(turns) != len(source):
      raise DataError(f"the source has {len(source)} records but {len(turns)} turn counts")
    index = []  # (record, round), round None: the record stays whole.
    for i, n in enumerate(turns):
      if i not in bad:
        index += [(i, k) for k in range(n // 2)] if n and n % 2 == 0 else [(i, None)]
    self._index = index
    self.has_image = has_image[[i for i, _ in index]] if index else np.zeros(0, bool)

  def __len__(self):
    return len(self._index)

  def __getitem__(self, j):
    i, k = self._index[j]
    r = dict(self._source[i])
    r.setdefault("index", i)
    r.setdefault("record_id", r["id"])
    if k is None:
      return r
    if len(r["conversations"]) < 2 * k + 2:
      raise DataError(f"{self.name}: record {r['index']} (id {r['record_id']!r}): "
                      f"{len(r['conversations'])} turns, but the source's turn counts promised "
                      f"round {k}; prepare the dataset again")
    r["conversations"] = templates.one_round(r["conversations"], k, self.has_image[j])
    r["id"] = f"{r['id']}#{k}"
    r["meta"] = {**(r.get("meta") or {}), "round": k}
    return r
