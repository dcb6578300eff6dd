"""What every benchmark module shares: the Question record, the Benchmark description,
file reading whose errors name the file, record and field, prediction checks, and the
answer rules several benchmarks use (option letters, GQA's cleanup)."""
import collections
import csv
import dataclasses
import json
import os
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Question:
  """One benchmark question, ready to send to a model.

  Attributes:
    qid: Unique within the benchmark file(s).
    image: Absolute path of the image file, or None.
    prompt: The user turn without "<image>", including the benchmark's suffix.
    answer: The reference (str, list[str] of human answers, ...), None if unreleased.
    meta: Category, split, options, etc.
  """
  qid: str
  image: str | None
  prompt: str
  answer: Any
  meta: dict = dataclasses.field(default_factory=dict)


def open_ended_chance(questions: Sequence[Question]) -> float:
  """Open-ended answers: a uniform guess over all strings is never right."""
  del questions
  return 0.0


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark, as the evaluator and the baselines use it.

  Attributes:
    name: What --benchmarks calls it.
    load: The loader, (files...) -> [Question] (arguments differ per benchmark).
    score: (questions, {qid: prediction}) -> {metric: float}.
    headline: The metric that summarises it (tables, plots, baselines).
    fields: config.eval.benchmarks.<name>: field -> default; the str fields are the
      paths a user sets (all of them) to evaluate the benchmark on their files.
    from_config: (that config block, workdir) -> [Question], from the user's files.
    from_builtin: (the built-in benchmark folder) -> [Question]; None: no built-in version.
    form: (question, its normalised question prefix) -> what an image-blind guesser may
      condition on (see baselines.py).
    chance: questions -> the headline metric of uniform guessing, or None where only the
      caller knows the answer sets.
  """
  name: str
  load: Callable[..., list[Question]]
  score: Callable[[Sequence[Question], Mapping[str, str]], dict]
  headline: str
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  from_config: Callable[[Any, str], list[Question]] | None = None
  from_builtin: Callable[[str], list[Question]] | None = None
  form: Callable[[Question, str], tuple] = lambda q, prefix: (prefix,)
  chance: Callable[[Sequence[Question]], float | None] = open_ended_chance

  @property
  def path_fields(self) -> tuple[str, ...]:
    """The config fields that name the user's files (all must be set)."""
    return tuple(k for k, v in self.fields.items() if isinstance(v, str))


# ---------------------------------------------------------------------------
# File reading with errors that name the file, record and field.

def need_file(path: PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    kind = "is a directory, not a file" if os.path.isdir(path) else "not found"
    raise FileNotFoundError(f"{what} {kind}: {path}")
  return path


def need_dir(path: PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} not found (expected a directory): {path}")
  return path


def read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _parse_json(text: str, path: str, line: int | None = None) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    where = (f"line {line}, column {e.colno}" if line is not None
             else f"line {e.lineno}, column {e.colno} (char {e.pos})")
    raise ValueError(f"{path}: malformed JSON at {where}: {e.msg}") from None


def load_json(path: PathLike, what: str, kind: type | None = None) -> Any:
  path = need_file(path, what)
  obj = _parse_json(read_text(path), path)
  if kind is not None and not isinstance(obj, kind):
    raise ValueError(f"{path}: expected a JSON {kind.__name__} ({what}), "
                     f"got {type(obj).__name__}")
  return obj


def load_json_lines(path: PathLike, what: str) -> list:
  """JSON lines; a file holding one JSON list is accepted too."""
  path = need_file(path, what)
  text = read_text(path)
  if text.lstrip().startswith("["):
    records = _parse_json(text, path)
  else:
    records = [_parse_json(line, path, n) for n, line in enumerate(text.splitlines(), 1)
               if line.strip()]
  for n, rec in enumerate(records, 1):
    if not isinstance(rec, dict):
      raise ValueError(f"{path}: record {n} is a {type(rec).__name__}, not a JSON object")
  return records


def read_tsv(path: str, columns: Sequence[str]) -> list[dict]:
  """The rows of a TSV file (as pandas writes it) as dicts; `columns` must be in its header."""
  limit = csv.field_size_limit()
  csv.field_size_limit(2**31 - 1)  # Base64 images exceed the 128 KiB default.
  try:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f, delimiter="\t")
      rows = list(reader)
      header = reader.fieldnames or []
  except (csv.Error, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: malformed TSV: {e}") from None
  finally:
    csv.field_size_limit(limit)
  for col in columns:
    if col not in header:
      raise ValueError(f"{path}: no column {col!r} (header: {header})")
  return rows


def field(rec: Mapping, key: str, path: str, rid: Any, kind: type | tuple | None = None) -> Any:
  """rec[key], or a ValueError naming the file, the record and the field."""
  if not isinstance(rec, Mapping):
    raise ValueError(f"{path}: record {rid!r} is a {type(rec).__name__}, not an object")
  if key not in rec or rec[key] is None:
    raise ValueError(f"{path}: record {rid!r} has no field {key!r}")
  value = rec[key]
  if kind is not None and not isinstance(value, kind):
    raise ValueError(f"{path}: record {rid!r} field {key!r} has type {type(value).__name__}")
  return value


def image(folder: str, rel: str, qid: str, bench: str, src: str, where: str = "") -> str:
  """The absolute path of folder/rel, or a FileNotFoundError naming the question file
  `src`, the record (`where`, e.g. "line 3") and the question id."""
  path = os.path.abspath(os.path.join(folder, rel))
  if not os.path.isfile(path):
    at = f" ({where})" if where else ""
    raise FileNotFoundError(f"{src}: {bench} question {qid}{at}: image not found: {path}")
  return path


def unique_qids(questions: list[Question], where: str) -> list[Question]:
  seen = set()
  for q in questions:
    if q.qid in seen:
      raise ValueError(f"{where}: duplicate question id {q.qid!r}")
    seen.add(q.qid)
  return questions


def options_text(options: Sequence[str]) -> str:
  return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


# ---------------------------------------------------------------------------
# Prediction checks and means.

def show(ids: Iterable[str], limit: int = 10) -> str:
  ids = sorted(ids)
  more = f" ... (+{len(ids) - limit} more)" if len(ids) > limit else ""
  return ", ".join(repr(i) for i in ids[:limit]) + more


def need_answers(questions: Sequence[Question], where: str, what: str) -> None:
  """A ValueError unless there are questions and every one has a reference answer; `what`
  says what for (e.g. "to score")."""
  if not questions:
    raise ValueError(f"{where}: no questions {what}")
  no_ref = [q.qid for q in questions if q.answer is None]
  if no_ref:
    raise ValueError(f"{where}: {len(no_ref)} of {len(questions)} questions have no reference "
                     f"answer {what} (an unannotated split? give an annotated one): "
                     f"{show(no_ref)}")


def check(questions: Sequence[Question], predictions: Mapping[str, str], bench: str):
  """Every question has a reference answer and a str prediction, every prediction a
  question."""
  need_answers(questions, bench, "to score")
  ids = [q.qid for q in questions]
  if len(set(ids)) != len(ids):
    dup = [k for k, c in collections.Counter(ids).items() if c > 1]
    raise ValueError(f"{bench}: duplicate question ids {show(dup)}")
  missing = [i for i in ids if i not in predictions]
  if missing:
    raise ValueError(f"{bench}: no prediction for {len(missing)} of {len(ids)} questions: "
                     f"{show(missing)}")
  unknown = set(predictions) - set(ids)
  if unknown:
    raise ValueError(f"{bench}: predictions for {len(unknown)} unknown question ids: "
                     f"{show(map(str, unknown))}")
  bad = [i for i in ids if not isinstance(predictions[i], str)]
  if bad:
    raise ValueError(f"{bench}: predictions must be str; not for {show(bad)}")


def mean(values: Sequence[float]) -> float:
  return float(sum(values)) / len(values) if values else 0.0


def breakdown(out: dict, prefix: str, keys: Sequence[Any], values: Sequence[float]):
  """out["<prefix>/<key>"] = mean of values per key (None keys skipped)."""
  groups = collections.defaultdict(list)
  for k, v in zip(keys, values):
    if k is not None:
      groups[k].append(v)
  for k in sorted(groups, key=str):
    out[f"{prefix}/{k}"] = mean(groups[k])


# ---------------------------------------------------------------------------
# Answer rules shared by several benchmarks.

_LETTER_START = (
    re.compile(r"([A-Z])[.):]"),          # "A." "A)" "A:", "A. dog".
    re.compile(r"\(([A-Z])\)"),           # "(A)", "(A) dog".
    re.compile(r"([A-Z])\s"),             # "A dog" (a capital letter word).
)
_ANSWER_IS = re.compile(r"(?i:the answer is)\s*:?\s*\(?([A-Z])(?![A-Za-z])")


def parse_letter(pred: str, n_options: int) -> str | None:
  """The option letter a free-text answer picks, or None.

  Rules, in order, on the stripped text: the whole text is one valid capital
  letter ("B"); it starts with "B." / "B)" / "B:", "(B)",
  or "B " ("B dog"); it contains "the answer is B" (any case for the
  phrase; one distinct letter, as LLaVA's ScienceQA eval). Letters must be
  capitals among the first n_options ("E" with 4 options -> None); lower case
  "b" is not a letter (and "a" is an article).
  """
  valid = LETTERS[:n_options]
  text = pred.strip()
  if len(text) == 1:
    return text if text in valid else None
  for pattern in _LETTER_START:
    m = pattern.match(text)
    if m and m.group(1) in valid:
      return m.group(1)
  found = set(_ANSWER_IS.findall(text))
  if len(found) == 1 and (letter := found.pop()) in valid:
    return letter
  return None


def gqa_normalize(pred: str) -> str:
  """LLaVA's GQA answer cleanup: strip, drop trailing periods, lower case."""
  return pred.strip().rstrip(".").lower()
