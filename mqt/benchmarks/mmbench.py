"""MMBench: multiple-choice questions, evaluated circularly (every rotation of the options
must be answered right).

File: a TSV (as pandas writes it) with columns index, question, hint, A, B, C, D, ...,
answer, category, l2-category?, image (base64, or the index of a row holding the same
image). The image is decoded to <cache_dir>/<index>.png|.jpg. With circular=True each
question with k options becomes k prompts, options rotated left by 0..k-1; qid
"<index>@<shift>". Rows with index >= 1e6 whose index % 1e6 is also in the file
(pre-rotated copies, as in VLMEvalKit's files) are dropped, since rotations are made
here. Prompt: hint + "\\n" (if any) + question + "\\n" + "A. option" lines +
"\\nAnswer with the option's letter from the given choices directly."; answers are read
with `mmbench_choice`. Headline: accuracy (circular); chance: the mean of
(1 / options) ** rotations. Config: config.eval.benchmarks.mmbench.tsv and .circular.
"""
import base64
import binascii
import collections
import os
import re
from typing import Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import LETTERS, Benchmark, PathLike, Question

# The strings pandas reads as NaN (LLaVA and VLMEvalKit read the TSV with pandas).
_NA = frozenset(("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                 "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"))
_CIRCULAR_OFFSET = 1_000_000


def _present(value: str | None) -> bool:
  return value is not None and value not in _NA


def _decode_image(data: str, path: str, index: str) -> bytes:
  try:
    raw = base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError):
    raise ValueError(f"{path}: record {index!r} field 'image' is not valid base64") from None
  if not raw:
    raise ValueError(f"{path}: record {index!r} field 'image' is empty")
  return raw


def _options_and_answer(row: dict, path: str, index: str) -> tuple[list[str], str | None]:
  """The consecutive non-empty A, B, C, ... columns and the answer letter (None if the
  file has none)."""
  options = []
  for letter in LETTERS:
    if not _present(row.get(letter)):
      break
    options.append(row[letter])
  if not options:
    raise ValueError(f"{path}: record {index!r} has no field 'A' (no options)")
  answer = row.get("answer")
  if not _present(answer):
    return options, None
  answer = answer.strip()
  if answer not in LETTERS[:len(options)]:
    raise ValueError(f"{path}: record {index!r} answer {answer!r} is not one of its "
                     f"options {LETTERS[:len(options)]}")
  return options, answer


def _save_image(row: dict, by_index: dict, path: str, index: str, cache: str) -> str:
  """Decodes the row's image (or that of the row its image field names) into cache."""
  image = row["image"]
  if _present(image) and image.isdigit() and len(image) <= 64 and image in by_index:
    image = by_index[image]["image"]  # Dedup: the index of a row holding the image.
  if not _present(image):
    raise ValueError(f"{path}: record {index!r} has no field 'image'")
  raw = _decode_image(image, path, index)
  ext = ".png" if raw.startswith(b"\x89PNG") else ".jpg"
  image_path = os.path.abspath(os.path.join(cache, re.sub(r"[^\w.-]", "_", index) + ext))
  with open(image_path, "wb") as f:
    f.write(raw)
  return image_path


def load_mmbench(tsv_path: PathLike, cache_dir: PathLike, circular: bool = True
                 ) -> list[Question]:
  """MMBench from its TSV; images decoded to cache_dir (created).

  Prompt: hint + "\\n" (if any) + question + "\\n" + "A. ..." lines +
  CHOICE_SUFFIX; options are the consecutive non-empty A, B, C, ... columns.
  circular: k rotated copies per question (shift s puts original option
  (j + s) % k at letter j); else shift 0 only. Answer: the letter (None if the
  file has no answer column, as the test split).
  """
  path = common.need_file(tsv_path,
                          "MMBench TSV file (index, question, hint, A, B, ..., image)")
  rows = common.read_tsv(path, ("index", "question", "A", "image"))
  indices = [r["index"] for r in rows]
  if len(set(indices)) != len(indices):
    dup = [k for k, c in collections.Counter(indices).items() if c > 1]
    raise ValueError(f"{path}: duplicate index {common.show(dup)}")
  by_index = {r["index"]: r for r in rows}
  cache = os.fspath(cache_dir)
  os.makedirs(cache, exist_ok=True)
  questions = []
  for n, row in enumerate(rows, 2):  # Line 1 is the header.
    index = row["index"]
    if not _present(index):
      raise ValueError(f"{path}: row on line {n} has no index")
    if index.isdigit() and int(index) >= _CIRCULAR_OFFSET and \
        str(int(index) % _CIRCULAR_OFFSET) in by_index:
      continue  # A pre-rotated copy; rotations are made below.
    question = row["question"]
    if not _present(question):
      raise ValueError(f"{path}: record {index!r} has no field 'question'")
    options, answer = _options_and_answer(row, path, index)
    image_path = _save_image(row, by_index, path, index, cache)
    hint = row.get("hint")
    stem = (f"{hint}\n" if _present(hint) else "") + question
    k = len(options)
    meta = {"index": index, "question": question}
    for col, key in (("category", "category"), ("l2-category", "l2_category")):
      meta[key] = row[col] if _present(row.get(col)) else None
    for shift in range(k if circular else 1):
      rotated = options[shift:] + options[:shift]
      letter = None if answer is None else LETTERS[(LETTERS.index(answer) - shift) % k]
      prompt = f"{stem}\n{common.options_text(rotated)}{common.CHOICE_SUFFIX}"
      questions.append(Question(f"{index}@{shift}", image_path, prompt, letter,
                                dict(meta, shift=shift, options=rotated)))
  return questions


def mmbench_choice(pred: str, options: Sequence[str]) -> str | None:
  """The letter an MMBench answer picks: a bare letter, else an option's text
  (case-insensitive, trailing period ignored), else `parse_letter`."""
  text = pred.strip()
  if len(text) == 1 and text in LETTERS[:len(options)]:
    return text
  norm = text.rstrip(".").strip().lower()
  for i, o in enumerate(options):
    if norm == o.strip().rstrip(".").strip().lower():
      return LETTERS[i]
  return common.parse_letter(text, len(options))


def score_mmbench(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy = circular_accuracy (a question counts if every rotation is right),
  single_accuracy (shift 0 only), category/<c> and l2_category/<c> circular
  accuracies, unparsed (answers picking no option), n (original questions)."""
  common.check(questions, predictions, "mmbench")
  groups = collections.defaultdict(dict)
  metas, unparsed = {}, 0
  for q in questions:
    letter = mmbench_choice(predictions[q.qid], q.meta["options"])
    unparsed += letter is None
    groups[q.meta["index"]][q.meta["shift"]] = letter == q.answer
    metas[q.meta["index"]] = q.meta
  order = list(groups)
  if any(0 not in groups[i] for i in order):
    raise ValueError("mmbench: some questions lack their shift-0 prompt: "
                     + common.show(i for i in order if 0 not in groups[i]))
  circ = [float(all(groups[i].values())) for i in order]
  single = [float(groups[i][0]) for i in order]
  out = {"accuracy": common.mean(circ), "circular_accuracy": common.mean(circ),
         "single_accuracy": common.mean(single), "unparsed": float(unparsed),
         "n": float(len(order))}
  common.breakdown(out, "category", [metas[i]["category"] for i in order], circ)
  common.breakdown(out, "l2_category", [metas[i]["l2_category"] for i in order], circ)
  return out


def _chance(questions: Sequence[Question]) -> float:
  rotations = collections.Counter(q.meta["index"] for q in questions)
  k = {q.meta["index"]: len(q.meta["options"]) for q in questions}
  return common.mean([(1.0 / k[i]) ** r for i, r in rotations.items()])


BENCHMARK = Benchmark(
    name="mmbench", load=load_mmbench, score=score_mmbench, headline="accuracy",
    fields={"tsv": "", "circular": True},
    from_config=lambda b, workdir: load_mmbench(
        b.tsv, os.path.join(workdir, "mmbench_images"), b.circular),
    form=lambda q, prefix: (len(q.meta["options"]), prefix), chance=_chance)
