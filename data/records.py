"""The one judgment of a LLaVA record: usable, or unusable for a named reason.

Preparation (data/tfds_builders.py) and training (data/sources.py, data/pipeline.py)
both judge records here, so a record accepted by one is accepted by the other:

  structure_problem   a record's fields and turns, without reading any file
                      (the turn checks are data/templates.py's own);
  image_problem       its image, decoded fully by `load_image`, the decoder that
                      training uses (a truncated JPEG is unusable here too);
  judge_records       every record of a file, images decoded in threads, with a
                      progress line per 1000 records;
  Ledger              how many records went unused, per reason, each counted once.

Every unusable record becomes a `Problem` whose one-line message names the file,
the record's index and id and the reason, e.g.
  "train.json: record 12 (id 'cat-3'): image_without_image_token: has an image but
   no <image> in its first human turn".
"""
import concurrent.futures
import os
from typing import Callable, Iterable, NamedTuple

from data import images as images_lib
from data import paths
from data import templates

# Stable keys (they are stored in prepared datasets and checkpoints) -> what they mean.
REASONS = {
    "not_an_object": "the record is not a JSON object",
    "bad_id": "the id is neither a string nor an integer",
    "duplicate_id": "an earlier record of the file has the same id",
    "no_conversations": "the record has no 'conversations' field",
    "empty_conversations": "'conversations' is an empty list",
    "bad_turn": "'conversations' is not a list of {'from': str, 'value': str} turns",
    "not_alternating": ("the turns do not start with 'human', alternate human / gpt and end "
                        "on a gpt answer"),
    "image_token_without_image": "<image> in the text of a record that has no image",
    "image_without_image_token": "an image but no <image> in the first human turn",
    "several_image_tokens": "more than one <image>, or one outside the first human turn",
    "bad_image_field": "the 'image' field is not a non-empty relative path string",
    "missing_image": "the image file does not exist",
    "empty_image": "the image file is empty (zero bytes)",
    "unreadable_image": "the image file exists but cannot be read (permissions, I/O error)",
    "corrupt_image": ("the image does not decode fully (truncated, corrupt, unknown format, "
                      "too many pixels)"),
    "overlong": ("more text tokens than max_text_len with overlong='reject', or a truncation "
                 "that would cut off the image placeholder"),
    "untemplatable": ("the conversation does not fit the template (plain: one image and one "
                      "round; vicuna_v1 / qa: no empty turn, no literal </s>)"),
    "unknown": "skipped by a preparation that did not record reasons",
}

# data/templates.py's structural messages -> reason keys (first substring found wins).
_TEMPLATE_MESSAGES = (
    ("empty conversation", "empty_conversations"),
    ("is not a {", "bad_turn"),
    ("ends on a human turn", "not_alternating"),
    ("expected 'human'", "not_alternating"),
    ("expected 'gpt'", "not_alternating"),
    ("text-only sample", "image_token_without_image"),
    ("has an image but no", "image_without_image_token"),
    ("times in the first turn", "several_image_tokens"),
    ("outside the first human turn", "several_image_tokens"),
)

PROGRESS_EVERY = 1000  # Records per progress line (files with more records than this).
_IMAGE_THREADS = 8


class DataError(ValueError):
  """Bad input data; the message names the file and the record."""


class Unusable(DataError):
  """A record (or its image) is unusable: `reason` (a REASONS key) and `text` (why)."""

  def __init__(self, reason: str, text: str):
    if reason not in REASONS:
      raise ValueError(f"unknown reason {reason!r}; add it to data.records.REASONS")
    super().__init__(f"{reason}: {text}")
    self.reason, self.text = reason, text


class Problem(NamedTuple):
  """One unusable record.

  index: its position in its file (or prepared dataset); -1 where unknown.
  id: its id as a string ("#<index>" when it has none or a bad one).
  reason: a REASONS key.
  message: one line naming the file, index, id and reason, and saying why.
  """
  index: int
  id: str
  reason: str
  message: str


def make_problem(file: str, index: int, rid: str, reason: str, text: str) -> Problem:
  """A Problem whose message reads "<file>: record <index> (id '<id>'): <reason>: <text>"."""
  if reason not in REASONS:
    raise ValueError(f"unknown reason {reason!r}; add it to data.records.REASONS")
  where = f"record {index}" if index >= 0 else "record"
  text = " ".join(str(text).split())  # One line, whatever the decoder said.
  return Problem(int(index), str(rid), reason, f"{file}: {where} (id {rid!r}): {reason}: {text}")


def fail_message(problem: Problem) -> str:
  """The DataError message for on_error="fail": the problem and what to do."""
  return (f"{problem.message} (fix or remove the record, or set on_error='skip' to skip "
          f"and count such records)")


def skip_line(problem: Problem) -> str:
  """The one line logged the first time a reason is met."""
  return f"skipping records: {problem.reason} (first: {problem.message})"


def _show(value, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def conversation_problem(conversations, has_image: bool) -> tuple[str, str] | None:
  """Judges a conversation's turns (no template, no tokenizer).

  Args:
    conversations: the record's "conversations" value, any JSON type.
    has_image: the record has an image.

  Returns:
    None if usable, else (reason key, why). The turn rules are data/templates.py's
    (`_conversation_problem`), mapped onto reason keys.
  """
  if not isinstance(conversations, list):
    return "bad_turn", f"'conversations' is a {type(conversations).__name__}, not a list of turns"
  if not conversations:
    return "empty_conversations", "'conversations' is an empty list"
  for i, turn in enumerate(conversations):
    if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
            and isinstance(turn.get("value"), str)):
      return "bad_turn", (f"turn {i} is {_show(turn)}; every turn must be "
                          f"{{'from': str, 'value': str}}")
  # pylint: disable-next=protected-access
  text = templates._conversation_problem(conversations, has_image)
  if text is None:
    return None
  reason = next((r for key, r in _TEMPLATE_MESSAGES if key in text), "untemplatable")
  return reason, text


def record_id(rec, index: int) -> tuple[str, str | None]:
  """(the record's id as a string, None) or ("#<index>", why the id is bad)."""
  if not isinstance(rec, dict) or "id" not in rec:
    return f"#{index}", None
  rid = rec["id"]
  if isinstance(rid, bool) or not isinstance(rid, (str, int)):
    return f"#{index}", f"the id {_show(rid)} is a {type(rid).__name__}; use a string or an int"
  return str(rid), None


def structure_problem(rec, index: int, file: str, seen_ids: dict | None = None) -> Problem | None:
  """Judges one record of a LLaVA JSON without reading any file.

  Args:
    rec: the record as parsed from JSON (any type).
    index: its position in the file.
    file: how to name the file in messages.
    seen_ids: id -> index of the file's earlier records; this record's id is added.

  Returns:
    None if usable, else the first Problem found (not_an_object, bad_id, duplicate_id,
    bad_image_field, no_conversations, then the turn reasons of `conversation_problem`).
  """
  rid, bad = record_id(rec, index)
  fail = lambda reason, text: make_problem(file, index, rid, reason, text)
  if not isinstance(rec, dict):
    return fail("not_an_object", f"a {type(rec).__name__}, not an object with 'id' and "
                                 f"'conversations'")
  if bad:
    return fail("bad_id", bad)
  if seen_ids is not None:
    if rid in seen_ids:
      return fail("duplicate_id", f"id {rid!r} is already used by record {seen_ids[rid]}")
    seen_ids[rid] = index
  if "image" in rec and not (isinstance(rec["image"], str) and rec["image"]):
    return fail("bad_image_field", f"'image' is {_show(rec['image'])}; it must be a non-empty "
                                   f"path relative to the image folder")
  if "conversations" not in rec:
    return fail("no_conversations", "no 'conversations' field (a list of {'from', 'value'} "
                                    "turns)")
  found = conversation_problem(rec["conversations"], "image" in rec)
  return fail(*found) if found else None


def load_image(source, name: str | None = None):
  """Reads and fully decodes an image, as training does (`data.images.load_image`).

  Args:
    source: a file path or the encoded bytes.
    name: how to name it in messages (default: the path, or "<bytes>").

  Returns:
    An RGB PIL image [H, W, 3].

  Raises:
    Unusable: missing_image, unreadable_image, empty_image or corrupt_image.
  """
  is_path = isinstance(source, (str, os.PathLike))
  label = name or (os.fspath(source) if is_path else "<bytes>")
  if is_path:
    try:
      data = paths.read_bytes(source)
    except FileNotFoundError:
      raise Unusable("missing_image", f"no image file {label}") from None
    except OSError as e:
      raise Unusable("unreadable_image", f"cannot read {label}: {e.strerror or e}") from None
  else:
    data = bytes(source)
  if not data:
    raise Unusable("empty_image", f"image file {label} is empty (0 bytes)")
  try:
    return images_lib.load_image(data, name=label)
  except images_lib.ImageError as e:
    raise Unusable("corrupt_image", str(e)) from None


def image_problem(source, name: str | None = None) -> tuple[str, str] | None:
  """None if the image (path or bytes) decodes fully, else (reason key, why)."""
  try:
    load_image(source, name)
  except Unusable as e:
    return e.reason, e.text
  return None


def judge_records(records: list, file: str, image_folder: str | None, on_error: str = "fail",
                  progress: Callable[[str], None] | None = None) -> tuple[list[int], list]:
  """Judges every record of a LLaVA JSON: structure, then its image decoded fully.

  Args:
    records: the parsed JSON array.
    file: how to name the file in messages.
    image_folder: where the records' relative image paths point.
    on_error: "fail": raise at the first unusable record (in file order); "skip": list them.
    progress: called with one line per PROGRESS_EVERY records when there are more
      (default: printed, flushed); False: silent.

  Returns:
    (indices of the usable records, in order; their Problems, in order).

  Raises:
    DataError: on_error="fail" and a record is unusable (`fail_message` of the first).
  """
  if on_error not in ("fail", "skip"):
    raise ValueError(f"on_error={on_error!r}; choose 'fail' or 'skip'")
  if progress is None:
    progress = lambda line: print(line, flush=True)
  good, problems, seen = [], [], {}
  n = len(records)
  with concurrent.futures.ThreadPoolExecutor(min(_IMAGE_THREADS, os.cpu_count() or 1)) as pool:
    for start in range(0, n, PROGRESS_EVERY):
      chunk = range(start, min(start + PROGRESS_EVERY, n))
      found = {i: structure_problem(records[i], i, file, seen) for i in chunk}
      with_image = [i for i in chunk if found[i] is None and "image" in records[i]]
      files = [paths.join(image_folder or "", records[i]["image"]) for i in with_image]
      for i, bad in zip(with_image, pool.map(image_problem, files)):
        if bad:
          found[i] = make_problem(file, i, record_id(records[i], i)[0], *bad)
      good += [i for i in chunk if found[i] is None]
      problems += [found[i] for i in chunk if found[i] is not None]
      if on_error == "fail" and problems:
        raise DataError(fail_message(problems[0]))
      if progress and n > PROGRESS_EVERY:
        progress(f"{file}: judged {chunk.stop}/{n} records, {len(problems)} unusable so far")
  return good, problems


class Ledger:
  """Counts of the records left unused, per reason.

  A record (its index and id) counts once per reason, however often it is met (a
  later epoch, another round of it with split_rounds). `total` is the number of
  records of the source (records, not rounds). A record met under two reasons (two
  rounds of it failing differently) counts under both, once in `skipped_total`.
  """

  def __init__(self, total: int):
    self.total = int(total)
    self._records = {}  # reason -> {(index, id)}
    self._first = {}  # reason -> message of its first problem

  def add(self, problem: Problem) -> bool:
    """Counts `problem`'s record; True the first time its reason is seen (log it then,
    with `skip_line`)."""
    if problem.reason not in REASONS:
      raise ValueError(f"unknown reason {problem.reason!r}")
    new = problem.reason not in self._first
    self._records.setdefault(problem.reason, set()).add((int(problem.index), str(problem.id)))
    self._first.setdefault(problem.reason, problem.message)
    return new

  def add_all(self, problems: Iterable[Problem]) -> list[Problem]:
    """Adds each; -> the problems whose reason was new (one per reason)."""
    return [p for p in problems if self.add(p)]

  def totals(self) -> dict:
    """{"total": N, "used": N - skipped_total, "skipped": {reason: n},
    "skipped_total": records skipped for any reason}."""
    skipped = {r: len(s) for r, s in sorted(self._records.items())}
    n = len(set().union(*self._records.values())) if self._records else 0
    return {"total": self.total, "used": self.total - n, "skipped": skipped,
            "skipped_total": n}

  def summary(self) -> str:
    """One line: "records: N, used U, skipped S (reason: n, ...)"."""
    t = self.totals()
    detail = ", ".join(f"{r}: {n}" for r, n in t["skipped"].items())
    return (f"records: {t['total']}, used {t['used']}, skipped {t['skipped_total']}"
            + (f" ({detail})" if detail else ""))

  def state(self) -> dict:
    """JSON-serialisable state (for checkpoints)."""
    return {"total": self.total, "first": dict(self._first),
            "records": {r: sorted([i, rid] for i, rid in s) for r, s in self._records.items()}}

  @classmethod
  def union(cls, states) -> "Ledger":
    """The ledger of several (one per process): each reason's records united, its first
    message from the first state that has it."""
    states = list(states)
    ledger = cls(states[0]["total"])
    for state in states:
      part = cls.from_state(state)
      for reason, found in part._records.items():
        ledger._records.setdefault(reason, set()).update(found)
        ledger._first.setdefault(reason, part._first.get(reason, ""))
    return ledger

  @classmethod
  def from_state(cls, state: dict) -> "Ledger":
    ledger = cls(state["total"])
    ledger._first = dict(state.get("first", {}))
    ledger._records = {r: {(int(i), str(rid)) for i, rid in s}
                       for r, s in state.get("records", {}).items()}
    return ledger
