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

Every batch is a pure function of its global step (the plan), so a dataset can
also start at any step: `make_dataset(source, cfg, start_step=k)` yields from
batch k on. The trainer saves {"offset": start_step, "worker_count": w, "grain":
it.get_state()}; on resume with the same worker_count it calls
`make_dataset(..., start_step=offset)` and `it.set_state(grain)`; with another
worker_count (grain's states with and without worker processes differ) it calls
`make_dataset(..., start_step=<the restored step>)` instead.

Batch (per process, B = global batch / process count, T = max_text_len):
  images [B, S, S, 3] float32 (zeros for text-only or empty rows)
  input_ids [B, T] int32 (placeholder `IMAGE_TOKEN_ID` where the image goes)
  text_mask [B, T] bool, labels [B, T] int32 (`IGNORE_INDEX` where no loss)
  skipped, truncated, empty [B] bool;
  sample_id, meta [B] object (host only: ids and the records' extra fields);
  skip_reason, skip_message [B] object (host only: a data/records.py reason key
    and its one-line message for skipped rows, "" elsewhere);
  record [B] object (host only: (index, record id) of each row's record, None
    for empty rows; `batch_problems` turns skipped rows into records.Problem).

Sources judge their records up front (data/records.py) and serve only usable
ones. What can still fail while decoding (too long with `overlong="reject"`, or
truncation that would cut the image placeholder, a template the conversation
does not fit, an image that fails now though it was judged usable, an I/O
error): `on_error="fail"` raises `DataError` naming the file, record index, id
and reason; `on_error="skip"` turns the row into an empty row with `skipped`
set and its reason in `skip_reason`. Nothing is logged here (grain workers
would repeat it): the trainer counts `batch_problems` in a `records.Ledger`
and logs one line per reason; `text_problems` finds the text ones (overlong,
untemplatable) up front, by tokenizing every sample. Nothing is dropped silently.
"""
import dataclasses

import grain
import numpy as np
from absl import flags

from data import images as images_lib
from data import records as records_lib
from data import templates
from data import tokenizer as tokenizer_lib
from data.records import DataError, Unusable


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

  def encode_text(self, record) -> tuple[list[int], list[int], bool]:
    """The record's (ids, labels, truncated), at most max_text_len long; no image is read.

    Raises:
      records.Unusable: untemplatable, or overlong (too long with overlong="reject", or
        truncation would cut off the image placeholder).
    """
    c = self.cfg
    has_image = record["image"] is not None or record["image_path"] is not None
    try:
      ids, labels = templates.encode_conversation(record["conversations"], self.tokenizer,
                                                  c.template, has_image, sample_id=record["id"])
    except templates.ConversationError as e:
      found = records_lib.conversation_problem(record["conversations"], has_image)
      raise Unusable(*(found or ("untemplatable", f"{c.template} template: {e}"))) from None
    if len(ids) <= c.max_text_len:
      return ids, labels, False
    if c.overlong == "reject":
      raise Unusable("overlong", f"{len(ids)} text tokens exceed max_text_len="
                                 f"{c.max_text_len} (overlong='reject')")
    if templates.IMAGE_TOKEN_ID in ids[c.max_text_len:]:
      raise Unusable("overlong", f"truncating {len(ids)} text tokens to max_text_len="
                                 f"{c.max_text_len} would cut off the image placeholder")
    return ids[:c.max_text_len], labels[:c.max_text_len], True

  def __call__(self, record) -> dict:
    """-> {"ids", "labels", "image" ([S, S, 3] float32 or None), "truncated"}.

    Raises:
      records.Unusable: the sample cannot be used (reason and why).
    """
    c = self.cfg
    ids, labels, truncated = self.encode_text(record)
    image = None
    if record["image"] is not None or record["image_path"] is not None:
      src = record["image"] if record["image"] is not None else record["image_path"]
      img = records_lib.load_image(src, name=record["image_path"] or record["id"])
      try:
        image = images_lib.preprocess(img, c.image_size, c.image_mode)
      except ValueError as e:
        raise Unusable("corrupt_image", f"cannot preprocess the image: {e}") from None
    return {"ids": ids, "labels": labels, "image": image, "truncated": truncated}


def _record_key(record, index: int) -> tuple[int, str]:
  """(index in its file, record id) of a sample's record; `index` where it has none."""
  return int(record.get("index", index)), str(record.get("record_id", record["id"]))


def _row_problem(source, record, error: Unusable, index: int = -1) -> records_lib.Problem:
  """The Problem of a sample that cannot be used: its record's index and id, and its
  round named in the message when it is one round of a record."""
  index, rid = _record_key(record, index)
  round_k = (record.get("meta") or {}).get("round") if record["id"] != rid else None
  text = error.text if round_k is None else f"round {round_k}: {error.text}"
  return records_lib.make_problem(getattr(source, "name", "data"), index, rid, error.reason, text)


def text_problems(source, cfg: PipelineConfig, progress=None) -> list:
  """Tokenizes every sample of `source` as the pipeline does (no image is decoded) and
  returns the `records.Problem`s decoding would meet for the text (overlong,
  untemplatable), one per record and reason, in source order. A trainer can count
  them up front instead of when (if ever) their rows come up.

  progress: called with one line per records.PROGRESS_EVERY samples when there are more
  (default: printed, flushed; False: silent).
  """
  if progress is None:
    progress = lambda line: print(line, flush=True)
  decoder = SampleDecoder(cfg)
  found, seen = [], set()
  n = len(source)
  for i in range(n):
    record = source[i]
    try:
      decoder.encode_text(record)
    except Unusable as e:
      problem = _row_problem(source, record, e, i)
      if (problem.index, problem.id, problem.reason) not in seen:
        seen.add((problem.index, problem.id, problem.reason))
        found.append(problem)
    if progress and n > records_lib.PROGRESS_EVERY and (
        (i + 1) % records_lib.PROGRESS_EVERY == 0 or i + 1 == n):
      progress(f"{getattr(source, 'name', 'data')}: tokenized {i + 1}/{n} samples, "
               f"{len(found)} unusable so far")
  return found


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
    batch.update(skip_reason=np.full(b, "", object), skip_message=np.full(b, "", object),
                 record=np.full(b, None, object))
    for r, index in enumerate(rows):
      if index < 0:
        continue
      record = self.source[int(index)]
      key = _record_key(record, int(index))
      batch["sample_id"][r] = record["id"]
      batch["meta"][r] = record.get("meta") or {}
      batch["record"][r] = key
      try:
        row = self.decoder(record)
      except Unusable as e:
        problem = _row_problem(self.source, record, e, int(index))
        if c.on_error == "fail":
          raise DataError(records_lib.fail_message(problem)) from None
        batch["skipped"][r] = True
        batch["skip_reason"][r], batch["skip_message"][r] = problem.reason, problem.message
        continue
      n = len(row["ids"])
      batch["input_ids"][r, :n] = row["ids"]
      batch["labels"][r, :n] = row["labels"]
      batch["text_mask"][r, :n] = True
      batch["truncated"][r] = row["truncated"]
      if row["image"] is not None:
        batch["images"][r] = row["image"]
    return batch


def batch_problems(batch: dict) -> list:
  """The skipped rows of a batch as `records.Problem`s (for a `records.Ledger`)."""
  return [records_lib.Problem(batch["record"][r][0], batch["record"][r][1],
                              batch["skip_reason"][r], batch["skip_message"][r])
          for r in np.flatnonzero(batch["skip_reason"] != "")]


def make_dataset(source, cfg: PipelineConfig, start_step: int = 0) -> grain.IterDataset:
  """A checkpointable iterable of batches (`iter(ds)`; `it.get_state()`).

  Args:
    source: a record source (data/sources.py).
    cfg: the pipeline settings.
    start_step: the global batch number to start at: batch k of the result is batch
      start_step + k of the uninterrupted dataset (every batch is a function of its
      step). The trainer resumes with it where grain's own state does not fit (another
      worker_count); its iterator state then counts from start_step.

  Returns:
    A grain IterDataset of batches (module docstring), with `cfg.worker_count`
    prefetch processes.
  """
  if start_step < 0:
    raise ValueError(f"start_step={start_step}; it must be >= 0")
  problems = getattr(source, "problems", [])
  if not len(source) and problems:
    raise DataError(f"{getattr(source, 'name', 'data')}: none of its "
                    f"{getattr(source, 'total', len(problems))} records is usable; first: "
                    f"{problems[0].message}")
  plan = BatchPlan(source.has_image, cfg)
  if cfg.num_epochs is None:
    steps = grain.MapDataset.range(plan.batches_per_epoch).repeat(None)
  else:
    steps = grain.MapDataset.range(plan.batches_per_epoch * cfg.num_epochs)
  # The index given to the loader is the global step; slicing after the map keeps it.
  ds = steps.map_with_index(BatchLoader(source, plan, cfg))[start_step:].to_iter_dataset()
  if cfg.worker_count:
    # grain's worker processes read absl flags; outside an absl app (a notebook,
    # pytest) they would fail on unparsed flags.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return ds
