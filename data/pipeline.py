"""grain input pipeline: records -> fixed-shape, model-ready batches.

  source (data/sources.py) --plan--> batches of record indices per epoch
        --grain MapDataset.map_with_index--> decoded, collated numpy batches
        --to_iter_dataset (+ mp_prefetch workers)--> checkpointable iterator

The plan is a pure function of (seed, epoch): records are shuffled per epoch,
optionally grouped by modality (all-image or all-text batches, as stage 2 of
the paper), and cut into global batches; each process takes its own rows of
every global batch, so processes get disjoint shards that cover the data. The
last batch of a group is filled with empty rows (all-masked, weight 0) instead
of dropping samples. The iterator state is grain's `{"next_index": ...}`, so
resuming yields exactly the batches an uninterrupted run would.

Batch (per process, B = global batch / process count, T = max_text_len):
  images [B, S, S, 3] float32 (zeros for text-only or empty rows)
  input_ids [B, T] int32 (placeholder `IMAGE_TOKEN_ID` where the image goes)
  text_mask [B, T] bool, labels [B, T] int32 (`IGNORE_INDEX` where no loss)
  skipped, truncated, empty [B] bool;
  sample_id, meta [B] object (host only: ids and the records' extra fields).

Bad samples (unreadable image, bad conversation, too long with
`overlong="reject"`): `on_error="fail"` raises `DataError` naming the sample
and file; `on_error="skip"` logs it, turns the row into an empty row and counts
it in `skipped`. Nothing is dropped silently.
"""
import dataclasses
import logging

import grain
import numpy as np
from absl import flags

from data import images as images_lib
from data import templates
from data import tokenizer as tokenizer_lib
from data.sources import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  batch_size: int  # Global batch size (all processes).
  max_text_len: int  # T: text tokens per row, placeholder included.
  image_size: int
  template: str = "vicuna_v1"  # plain | vicuna_v1 | qa
  image_mode: str = "pad"  # pad (stage 2, eval) | crop (stage 1)
  tokenizer_path: str = ""
  seed: int = 0
  shuffle: bool = True
  group_by_modality: bool = True
  num_epochs: int | None = 1  # None: repeat forever.
  overlong: str = "truncate"  # truncate | reject
  on_error: str = "fail"  # fail | skip
  worker_count: int = 0  # grain worker processes (0: decode in this process).
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    for field, allowed in (("overlong", ("truncate", "reject")), ("on_error", ("fail", "skip")),
                           ("image_mode", ("pad", "crop")),
                           ("template", templates.TEMPLATES)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"data config {field}={getattr(self, field)!r}; choose one of {allowed}")
    if self.batch_size % self.process_count:
      raise ValueError(f"batch_size {self.batch_size} is not divisible by "
                       f"{self.process_count} processes")


class BatchPlan:
  """Which record goes in which row of which batch, as a function of the epoch."""

  def __init__(self, has_image: np.ndarray, cfg: PipelineConfig):
    self.has_image = np.asarray(has_image, bool)
    self.cfg = cfg
    if not len(self.has_image):
      raise DataError("the dataset is empty")
    groups = self._groups(np.arange(len(self.has_image)))
    self.batches_per_epoch = sum(-(-len(g) // cfg.batch_size) for g in groups)
    self._cache = (None, None)

  def _groups(self, order):
    if not self.cfg.group_by_modality:
      return [order]
    flags = self.has_image[order]
    return [g for g in (order[flags], order[~flags]) if len(g)]

  def epoch(self, epoch: int) -> np.ndarray:
    """[batches_per_epoch, batch_size] record indices, -1 for empty rows."""
    if self._cache[0] == epoch:
      return self._cache[1]
    rng = np.random.default_rng([self.cfg.seed, epoch])
    n = len(self.has_image)
    order = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
    bs = self.cfg.batch_size
    batches = []
    for g in self._groups(order):
      padded = np.full(-(-len(g) // bs) * bs, -1)
      padded[:len(g)] = g
      batches.append(padded.reshape(-1, bs))
    plan = np.concatenate(batches)
    if self.cfg.shuffle:
      plan = plan[rng.permutation(len(plan))]
    self._cache = (epoch, plan)
    return plan

  def rows(self, step: int) -> np.ndarray:
    """This process's record indices for global batch number `step`."""
    plan = self.epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]
    local = self.cfg.batch_size // self.cfg.process_count
    return plan[self.cfg.process_index * local:(self.cfg.process_index + 1) * local]


class SampleDecoder:
  """Record -> one row (ids, labels, image). Picklable: grain workers rebuild state."""

  def __init__(self, cfg: PipelineConfig):
    self.cfg = cfg
    self._tok = None

  @property
  def tokenizer(self):
    if self._tok is None:
      if not self.cfg.tokenizer_path:
        raise DataError("data.tokenizer_path is not set")
      self._tok = tokenizer_lib.Tokenizer.load(self.cfg.tokenizer_path)
    return self._tok

  def __getstate__(self):
    return {"cfg": self.cfg, "_tok": None}

  def __call__(self, record) -> dict:
    """Raises DataError naming the sample (and file) on bad input."""
    c = self.cfg
    sid = record["id"]
    has_image = record["image"] is not None or record["image_path"] is not None
    where = f"sample {sid}" + (f" (image {record['image_path']})" if record["image_path"] else "")
    try:
      ids, labels = templates.encode_conversation(record["conversations"], self.tokenizer,
                                                  c.template, has_image, sample_id=sid)
    except ValueError as e:
      raise DataError(f"{where}: {e}") from None
    truncated = False
    if len(ids) > c.max_text_len:
      if c.overlong == "reject":
        raise DataError(f"{where}: {len(ids)} text tokens exceed max_text_len={c.max_text_len}")
      if templates.IMAGE_TOKEN_ID in ids[c.max_text_len:]:
        raise DataError(f"{where}: truncating {len(ids)} tokens to {c.max_text_len} would cut "
                        f"off the image placeholder")
      ids, labels, truncated = ids[:c.max_text_len], labels[:c.max_text_len], True
    image = None
    if has_image:
      src = record["image"] if record["image"] is not None else record["image_path"]
      try:
        image = images_lib.load_and_preprocess(src, c.image_size, c.image_mode,
                                               name=record["image_path"] or sid)
      except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return {"ids": ids, "labels": labels, "image": image, "truncated": truncated}


class BatchLoader:
  """Global step -> this process's collated batch (grain `map_with_index`)."""

  def __init__(self, source, plan: BatchPlan, cfg: PipelineConfig):
    self.source, self.plan, self.cfg = source, plan, cfg
    self.decoder = SampleDecoder(cfg)

  def __call__(self, step: int, _=None) -> dict:
    c = self.cfg
    rows = self.plan.rows(step)
    b, t, s = len(rows), c.max_text_len, c.image_size
    batch = {
        "images": np.zeros((b, s, s, 3), np.float32),
        "input_ids": np.zeros((b, t), np.int32),
        "text_mask": np.zeros((b, t), bool),
        "labels": np.full((b, t), templates.IGNORE_INDEX, np.int32),
        "skipped": np.zeros(b, bool), "truncated": np.zeros(b, bool),
        "empty": rows < 0, "sample_id": np.full(b, "", object),
        "meta": np.full(b, None, object),
    }
    for r, index in enumerate(rows):
      if index < 0:
        continue
      record = self.source[int(index)]
      batch["sample_id"][r] = record["id"]
      batch["meta"][r] = record.get("meta") or {}
      try:
        row = self.decoder(record)
      except DataError as e:
        if c.on_error == "fail":
          raise
        log.warning("skipping %s", e)
        batch["skipped"][r] = True
        continue
      n = len(row["ids"])
      batch["input_ids"][r, :n] = row["ids"]
      batch["labels"][r, :n] = row["labels"]
      batch["text_mask"][r, :n] = True
      batch["truncated"][r] = row["truncated"]
      if row["image"] is not None:
        batch["images"][r] = row["image"]
    return batch


def make_dataset(source, cfg: PipelineConfig) -> grain.IterDataset:
  """A checkpointable iterable of batches (`iter(ds)`; `it.get_state()`)."""
  plan = BatchPlan(source.has_image, cfg)
  if cfg.num_epochs is None:
    steps = grain.MapDataset.range(plan.batches_per_epoch).repeat(None)
  else:
    steps = grain.MapDataset.range(plan.batches_per_epoch * cfg.num_epochs)
  ds = steps.map_with_index(BatchLoader(source, plan, cfg)).to_iter_dataset()
  if cfg.worker_count:
    # grain's worker processes read absl flags; outside an absl app (a notebook,
    # pytest) they would fail on unparsed flags.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return ds


def steps_per_epoch(source, cfg: PipelineConfig) -> int:
  return BatchPlan(source.has_image, cfg).batches_per_epoch
