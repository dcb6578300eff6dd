"""TFDS builders (ArrayRecord files, no TensorFlow) for LLaVA data and the built-in set.

  LlavaConversations  a LLaVA conversation JSON + image folder; one builder
                      config per user dataset (its name chosen at prepare time).
  MqtSynthetic        the built-in synthetic dataset (data/synthetic/):
                      splits `captions` (stage 1), `instruct` (stage 2), `eval`.

Records store the encoded image file bytes as they are (JPEG, PNG, ...), the
conversation as JSON text, and the sample id; per split, a `has_image` bitmap,
every record's turn count (so that a one-sample-per-round view need not read
the records) and the skipped samples go into the dataset metadata. Read them
back with `data.sources.TfdsSource(dataset_dir(...), split)`; preparing is
`python -m data.prepare` (see its --help).
"""
import collections
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from data import records as records_lib
from data.sources import DataError, load_llava_json, pack_bits, pack_counts


def _features():
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "conversations": tfds.features.Text(),  # JSON list of {"from", "value"}.
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # Encoded bytes or b"".
      "image_name": tfds.features.Text(),
      "has_image": tfds.features.Scalar(dtype=np.bool_),
      "meta": tfds.features.Text(),  # JSON of the record's other fields (type, answer, ...).
  })


def _meta(rec):
  return json.dumps({k: v for k, v in rec.items() if k not in ("id", "image", "conversations")})


class _Builder(tfds.core.GeneratorBasedBuilder):
  """Shared metadata bookkeeping: has_image bitmaps and skipped samples."""

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")  # tfrecord would need TensorFlow.
    super().__init__(**kwargs)

  def _info(self):
    # Generation order is kept (no shuffling by key) so that the has_image
    # bitmap lines up with record indices; the pipeline shuffles per epoch.
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(),
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _record_split(self, split, flags, problems, turns, total):
    """Stores a split's bitmaps, turn counts, record total and unusable records."""
    meta = self.info.metadata
    meta.setdefault("has_image", {})[split] = pack_bits(flags)
    meta.setdefault("turns", {})[split] = pack_counts(turns)
    meta.setdefault("skipped", {})[split] = [p._asdict() for p in problems]
    meta.setdefault("total", {})[split] = int(total)
    meta.setdefault("judged", {})[split] = True


def reason_lines(problems) -> list[str]:
  """One line per reason: "skipped <n> record(s): <reason> (first: <message>)"."""
  by_reason = collections.defaultdict(list)
  for p in problems:
    by_reason[p.reason].append(p)
  return [f"skipped {len(ps)} record(s): {reason} (first: {ps[0].message})"
          for reason, ps in sorted(by_reason.items())]


class LlavaConversations(_Builder):
  """A LLaVA-format conversation JSON and its image folder.

  Records are judged by data/records.py (structure, and every image decoded fully
  by the decoder training uses): on_error="fail" stops at the first unusable one,
  naming it; "skip" leaves them out, records them in the metadata and prints one
  line per reason with its count.
  """

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, json_path=None, image_folder=None, on_error="fail", **kwargs):
    self._json_path, self._image_folder, self._on_error = json_path, image_folder, on_error
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._json_path:
      raise DataError("LlavaConversations needs json_path to prepare")
    records = load_llava_json(self._json_path)
    keep, problems = records_lib.judge_records(records, self._json_path, self._image_folder,
                                               self._on_error)
    for line in reason_lines(problems):
      print(f"{self._json_path}: {line}", flush=True)
    if not keep:
      first = f"; first: {problems[0].message}" if problems else ""
      raise DataError(f"{self._json_path}: none of its {len(records)} records is usable"
                      f"{first}")
    return {"train": self._generate_examples(records, keep, problems)}

  def _generate_examples(self, records, keep, problems):
    flags, turns = [], []
    for i in keep:
      rec = records[i]
      sid = records_lib.record_id(rec, i)[0]
      data = b""
      if "image" in rec:
        with open(os.path.join(self._image_folder or "", rec["image"]), "rb") as f:
          data = f.read()
      flags.append("image" in rec)
      turns.append(len(rec["conversations"]))
      yield sid, {"id": sid, "conversations": json.dumps(rec["conversations"]),
                  "image": data, "image_name": rec.get("image", ""), "has_image": "image" in rec,
                  "meta": _meta(rec)}
    self._record_split("train", flags, problems, turns, len(records))


class MqtSynthetic(_Builder):
  """The built-in synthetic scenes (data/synthetic.py), encoded as PNG."""
  # The docstring is the prepared set's description in dataset_info.json: kept as it was
  # (the generator is now the package data/synthetic/) so that the files stay the same.

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, seed=0, image_size=64, sizes=None, **kwargs):
    self._seed, self._image_size = seed, image_size
    self._sizes = dict(sizes or {"captions": 4000, "instruct": 12000, "eval": 600})
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._sizes}

  def _generate_examples(self, split):
    from data import synthetic  # pylint: disable=import-outside-toplevel
    flags, turns = [], []
    for rec, image in synthetic.iter_records(self._seed, split, self._sizes[split],
                                             image_size=self._image_size):
      found = records_lib.conversation_problem(rec["conversations"], image is not None)
      if found:  # A generator bug: the built-in set is served as judged.
        raise DataError(f"built-in {split} record {rec['id']}: {found[0]}: {found[1]}")
      data = b""
      if image is not None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
      flags.append(image is not None)
      turns.append(len(rec["conversations"]))
      yield rec["id"], {"id": rec["id"], "conversations": json.dumps(rec["conversations"]),
                        "image": data, "image_name": rec.get("image", ""),
                        "has_image": image is not None, "meta": _meta(rec)}
    self._record_split(split, flags, [], turns, len(flags))


def dataset_dir(data_dir: str, builder_name: str, config: str | None = None,
                version: str = "1.0.0") -> str:
  parts = [data_dir, builder_name] + ([config] if config else []) + [version]
  return os.path.join(*parts)
