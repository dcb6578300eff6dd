r"""Benchmark loaders and scorers for the LLaVA-1.5 evaluation protocol.

For each benchmark, `load_<bench>(...)` reads the published files from
user-supplied paths and returns `Question` records (image paths made absolute
and checked to exist, prompts built with the benchmark's suffix), and
`score_<bench>(questions, predictions)` turns free-text model answers, keyed
by `Question.qid`, into a flat dict of metric name -> float. Per-category
breakdowns use "<kind>/<name>" keys (e.g. "random/f1", "category/ocr").
`BENCHMARKS` maps each name to its (loader, scorer).

Formats read (paths are the user's; "folder" is the image folder):
  scienceqa  problems.json: {pid: {"question", "choices": [...], "answer": int,
             "hint", "image": file name or null, "split", "subject", ...}} and
             pid_splits.json: {"test": [pid, ...]}. Only problems with an image
             are kept (the IMG subset). The image is the first file found of
             folder/<split>/<pid>/<image> (the release), folder/<pid>/<image>
             (folder = images/test, as LLaVA) and folder/<image> (a relative path).
  pope       JSON lines (a JSON list is accepted too), one file per split:
             {"question_id", "image", "text", "label": "yes"|"no", "category"?};
             qid "<split>/<question_id>"; image folder/<image>.
  mme        root/<subtask>/ with either images/ + questions_answers_YN/<name>.txt,
             or <name>.<jpg|png> next to <name>.txt; each txt line "question\tYes|No"
             (two per image). qid "<subtask>/<name>/<line number from 0>".
  gqa        testdev_balanced_questions.json: {qid: {"imageId", "question",
             "answer", "fullAnswer", "types": {"structural", "semantic",
             "detailed"}, ...}}; image folder/<imageId>.jpg, or folder/<image>
             when the record has an "image" field (a relative path).
  vqav2      questions {"questions": [{"image_id", "question", "question_id",
             "image"?}], "data_subtype"?} + annotations {"annotations":
             [{"question_id", "answers": [{"answer"}, ...], "answer_type", ...}]};
             image folder/COCO_<split>_<image_id:012d>.jpg (split: argument, else
             the questions file's "data_subtype") or folder/<image>.
  textvqa    {"data": [{"question_id", "question", "image_id", "answers": [str]}]};
             image folder/<image_id>.jpg.
  vizwiz     [{"image", "question", "answers": [{"answer", "answer_confidence"}],
             "answer_type"?}]; qid = the image name; image folder/<image>.
  mmbench    TSV (as pandas writes it) with columns index, question, hint, A, B,
             C, D, ..., answer, category, l2-category?, image (base64, or the
             index of a row holding the same image). The image is decoded to
             <cache_dir>/<index>.png|.jpg. With circular=True each question
             with k options becomes k prompts, options rotated left by 0..k-1;
             qid "<index>@<shift>". Rows with index >= 1e6 whose index % 1e6 is
             also in the file (pre-rotated copies, as in VLMEvalKit's files) are
             dropped, since rotations are made here.

  synthetic  the built-in held-out eval.json (data/synthetic.py): LLaVA records with
             "type" and "answer"; exact match per type.

Prompts omit "<image>" (the caller adds it). Short answers get
"\nAnswer the question using a single word or phrase." (VizWiz first
"\nWhen the provided information is insufficient, respond with 'Unanswerable'.");
multiple choice lists "A. option" lines after the question and ends with
"\nAnswer with the option's letter from the given choices directly.";
MME questions are used as given.

Answer rules (see each function): `parse_letter` (multiple choice) and
`mmbench_choice` (also option texts), `pope_yes_no` (LLaVA's eval_pope),
`mme_yes_no` (MME's calculation.py), `gqa_normalize` (LLaVA's GQA conversion),
`normalize_vqa_answer` and `vqa_soft_accuracy` (the official VQA evaluation).
Loaders raise FileNotFoundError / ValueError naming the file, record and field
at fault (a missing image: the question file, the record and the image path);
scorers raise ValueError when predictions miss questions or name unknown ones.
`baselines(name, questions)` gives a benchmark's "chance" and "image_blind"
scores in its headline metric (`HEADLINE`), for drawing beside the model's.
"""
import base64
import binascii
import collections
import csv
import dataclasses
import glob
import json
import os
import re
import string
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from data import synthetic

SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
VIZWIZ_SUFFIX = ("\nWhen the provided information is insufficient, respond with 'Unanswerable'."
                 + SHORT_SUFFIX)
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

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


# ---------------------------------------------------------------------------
# File reading with errors that name the file, record and field.

def _need_file(path: PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    kind = "is a directory, not a file" if os.path.isdir(path) else "not found"
    raise FileNotFoundError(f"{what} {kind}: {path}")
  return path


def _need_dir(path: PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} not found (expected a directory): {path}")
  return path


def _read_text(path: str) -> str:
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


def _load_json(path: PathLike, what: str, kind: type | None = None) -> Any:
  path = _need_file(path, what)
  obj = _parse_json(_read_text(path), path)
  if kind is not None and not isinstance(obj, kind):
    raise ValueError(f"{path}: expected a JSON {kind.__name__} ({what}), "
                     f"got {type(obj).__name__}")
  return obj


def _load_json_lines(path: PathLike, what: str) -> list:
  """JSON lines; a file holding one JSON list is accepted too."""
  path = _need_file(path, what)
  text = _read_text(path)
  if text.lstrip().startswith("["):
    records = _parse_json(text, path)
  else:
    records = [_parse_json(line, path, n) for n, line in enumerate(text.splitlines(), 1)
               if line.strip()]
  for n, rec in enumerate(records, 1):
    if not isinstance(rec, dict):
      raise ValueError(f"{path}: record {n} is a {type(rec).__name__}, not a JSON object")
  return records


def _field(rec: Mapping, key: str, path: str, rid: Any, kind: type | tuple | None = None) -> Any:
  """rec[key], or a ValueError naming the file, the record and the field."""
  if not isinstance(rec, Mapping):
    raise ValueError(f"{path}: record {rid!r} is a {type(rec).__name__}, not an object")
  if key not in rec or rec[key] is None:
    raise ValueError(f"{path}: record {rid!r} has no field {key!r}")
  value = rec[key]
  if kind is not None and not isinstance(value, kind):
    raise ValueError(f"{path}: record {rid!r} field {key!r} has type {type(value).__name__}")
  return value


def _image(folder: str, rel: str, qid: str, bench: str, src: str, where: str = "") -> str:
  """The absolute path of folder/rel, or a FileNotFoundError naming the question file
  `src`, the record (`where`, e.g. "line 3") and the question id."""
  path = os.path.abspath(os.path.join(folder, rel))
  if not os.path.isfile(path):
    at = f" ({where})" if where else ""
    raise FileNotFoundError(f"{src}: {bench} question {qid}{at}: image not found: {path}")
  return path


def _unique_qids(questions: list[Question], where: str) -> list[Question]:
  seen = set()
  for q in questions:
    if q.qid in seen:
      raise ValueError(f"{where}: duplicate question id {q.qid!r}")
    seen.add(q.qid)
  return questions


def _options_text(options: Sequence[str]) -> str:
  return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


# ---------------------------------------------------------------------------
# Prediction checks and answer rules.

def _show(ids: Iterable[str], limit: int = 10) -> str:
  ids = sorted(ids)
  more = f" ... (+{len(ids) - limit} more)" if len(ids) > limit else ""
  return ", ".join(repr(i) for i in ids[:limit]) + more


def _check(questions: Sequence[Question], predictions: Mapping[str, str], bench: str):
  """Every question has a str prediction, every prediction a question, every question
  a reference answer."""
  if not questions:
    raise ValueError(f"{bench}: no questions to score")
  ids = [q.qid for q in questions]
  if len(set(ids)) != len(ids):
    dup = [k for k, c in collections.Counter(ids).items() if c > 1]
    raise ValueError(f"{bench}: duplicate question ids {_show(dup)}")
  missing = [i for i in ids if i not in predictions]
  if missing:
    raise ValueError(f"{bench}: no prediction for {len(missing)} of {len(ids)} questions: "
                     f"{_show(missing)}")
  unknown = set(predictions) - set(ids)
  if unknown:
    raise ValueError(f"{bench}: predictions for {len(unknown)} unknown question ids: "
                     f"{_show(map(str, unknown))}")
  bad = [i for i in ids if not isinstance(predictions[i], str)]
  if bad:
    raise ValueError(f"{bench}: predictions must be str; not for {_show(bad)}")
  no_ref = [q.qid for q in questions if q.answer is None]
  if no_ref:
    raise ValueError(f"{bench}: {len(no_ref)} questions have no reference answer "
                     f"(an unannotated split?): {_show(no_ref)}")


def _mean(values: Sequence[float]) -> float:
  return float(sum(values)) / len(values) if values else 0.0


def _breakdown(out: dict, prefix: str, keys: Sequence[Any], values: Sequence[float]):
  """out["<prefix>/<key>"] = mean of values per key (None keys skipped)."""
  groups = collections.defaultdict(list)
  for k, v in zip(keys, values):
    if k is not None:
      groups[k].append(v)
  for k in sorted(groups, key=str):
    out[f"{prefix}/{k}"] = _mean(groups[k])


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


def pope_yes_no(pred: str) -> str:
  """POPE's answer rule (LLaVA eval_pope): "no" or "yes".

  The first sentence (text before the first "."), commas removed, lower case,
  split on whitespace: "no" if a word is "no" or "not", else "yes" (so an
  empty or unrelated answer counts as "yes"; "nothing" is not "no"). LLaVA
  does not lower-case (it tests "No", "no", "not"), so "NOT" differs.
  """
  words = pred.split(".")[0].replace(",", "").lower().split()
  return "no" if ("no" in words or "not" in words) else "yes"


def mme_yes_no(pred: str) -> str:
  """MME's answer rule (its calculation.py): "yes", "no" or "other".

  Lower case and stripped: "yes"/"no" as is; else "yes" if "yes" occurs in
  the first 4 characters, else "no" if "no" does; else "other" (always wrong).
  """
  text = pred.strip().lower()
  if text in ("yes", "no"):
    return text
  head = text[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def gqa_normalize(pred: str) -> str:
  """LLaVA's GQA answer cleanup: strip, drop trailing periods, lower case."""
  return pred.strip().rstrip(".").lower()


# ---------------------------------------------------------------------------
# The official VQA answer normalization (GT-Vision-Lab/VQA vqaEval.py).

_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")
_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a lookahead where a lookbehind
# was meant; it removes every "." not followed by a digit ("5." -> "5", "2.5" stays).
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_MAX = 32  # The official passes re.UNICODE (= 32) as `count`: at most 32 periods go.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# The official contraction table, verbatim (including its oddities: capitalized
# keys that never match lower-cased words, and "somebody'd" -> "somebodyd").
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def _vqa_clean(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
  """processPunctuation: each mark is deleted if it touches a space somewhere in the
  text (or the text has a digit,digit group anywhere), else replaced by a space."""
  out = text
  delete_all = _COMMA_DIGIT.search(text) is not None
  for p in _VQA_PUNCT:
    out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
  return _PERIOD.sub("", out, count=_PERIOD_MAX)


def _vqa_digit_article(text: str) -> str:
  """processDigitArticle: lower case, number words to digits, no articles, contractions."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
  """The official VQA answer normalization.

  Newlines/tabs to spaces and strip; punctuation (; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !)
  deleted where it touches a space or when the text has a digit,digit group,
  else replaced by a space; periods not followed by a digit deleted ("2.5"
  stays); lower case; "none".."ten" to "0".."10"; articles a/an/the dropped;
  contractions restored with the official table ("dont" -> "don't").
  """
  return _vqa_digit_article(_vqa_punctuation(_vqa_clean(text)))


def vqa_soft_accuracy(pred: str, answers: Sequence[str],
                      normalize_answers: bool | None = None) -> float:
  """VQA accuracy of one prediction against the human answers (usually 10).

  mean over i of min(1, #{j != i: answers[j] == pred} / 3): with 10 answers,
  4+ matches give 1.0, 3 give 0.9, 2 give 0.6, 1 gives 0.3.
  The prediction is always normalized (LLaVA normalizes predictions with the
  same rules before submitting). The human answers are cleaned (newlines,
  strip) and, as in the official evaluation, normalized only when they are
  not all the same (normalize_answers None); True normalizes them always (the
  TextVQA evaluator, m4c, does), False never.
  """
  if not answers:
    raise ValueError("vqa_soft_accuracy: no reference answers")
  p = normalize_vqa_answer(pred)
  gts = [_vqa_clean(a) for a in answers]
  if normalize_answers or (normalize_answers is None and len(set(gts)) > 1):
    gts = [_vqa_digit_article(_vqa_punctuation(a)) for a in gts]
  matches = sum(g == p for g in gts)
  # Leaving out answer i leaves `matches` matches, minus one when answer i matches.
  return _mean([min(1.0, (matches - (g == p)) / 3.0) for g in gts])


# ---------------------------------------------------------------------------
# ScienceQA-IMG.

def _scienceqa_image(folder: str, split: str, pid: str, name: str, src: str) -> str:
  cands = [os.path.join(folder, split, pid, name), os.path.join(folder, pid, name),
           os.path.join(folder, name)]
  for c in cands:
    if os.path.isfile(c):
      return os.path.abspath(c)
  raise FileNotFoundError(f"{src}: scienceqa question {pid}: image not found; looked for "
                          + ", ".join(os.path.abspath(c) for c in dict.fromkeys(cands)))


def load_scienceqa(problems_path: PathLike, pid_splits_path: PathLike, image_folder: PathLike,
                   split: str = "test") -> list[Question]:
  """ScienceQA-IMG: the problems of `split` that have an image.

  Prompt: "Context: {hint}\n" (only if the hint is not blank) + question +
  "\n" + "A. ..." lines + CHOICE_SUFFIX. Answer: the correct letter.
  """
  problems = _load_json(problems_path, "ScienceQA problems.json (pid -> problem)", dict)
  splits = _load_json(pid_splits_path, "ScienceQA pid_splits.json (split -> [pid])", dict)
  ppath, spath, folder = os.fspath(problems_path), os.fspath(pid_splits_path), \
      os.fspath(image_folder)
  if split not in splits:
    raise ValueError(f"{spath}: no split {split!r} (has {sorted(splits)})")
  questions = []
  for pid in splits[split]:
    pid = str(pid)
    if pid not in problems:
      raise ValueError(f"{spath}: split {split!r} lists problem {pid!r}, which {ppath} lacks")
    p = problems[pid]
    if not isinstance(p, dict):
      raise ValueError(f"{ppath}: record {pid!r} is a {type(p).__name__}, not an object")
    name = p.get("image")
    if not name:
      continue  # Not in the IMG subset.
    question = _field(p, "question", ppath, pid, str)
    choices = _field(p, "choices", ppath, pid, list)
    answer = _field(p, "answer", ppath, pid, int)
    if not 1 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
      raise ValueError(f"{ppath}: record {pid!r}: answer {answer} does not index its "
                       f"{len(choices)} choices")
    hint = str(p.get("hint") or "").strip()
    prompt = ((f"Context: {hint}\n" if hint else "") + f"{question}\n"
              + _options_text([str(c) for c in choices]) + CHOICE_SUFFIX)
    image = _scienceqa_image(folder, str(p.get("split") or split), pid, str(name), ppath)
    meta = {"choices": list(choices), "answer_index": answer, "split": p.get("split", split),
            "question": question}
    meta.update({k: p[k] for k in ("subject", "grade", "category", "topic") if k in p})
    questions.append(Question(pid, image, prompt, LETTERS[answer], meta))
  return _unique_qids(questions, ppath)


def score_scienceqa(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy (0..1; unparsed answers are wrong), unparsed (count), n, subject/<s>."""
  _check(questions, predictions, "scienceqa")
  right, unparsed = [], 0
  for q in questions:
    letter = parse_letter(predictions[q.qid], len(q.meta["choices"]))
    unparsed += letter is None
    right.append(float(letter == q.answer))
  out = {"accuracy": _mean(right), "unparsed": float(unparsed), "n": float(len(questions))}
  _breakdown(out, "subject", [q.meta.get("subject") for q in questions], right)
  return out


# ---------------------------------------------------------------------------
# POPE.

def _pope_files(files: Mapping[str, PathLike] | PathLike, pattern: str) -> dict[str, str]:
  if isinstance(files, Mapping):
    return {str(k): os.fspath(v) for k, v in files.items()}
  path = os.fspath(files)
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, pattern)))
    if not found:
      raise FileNotFoundError(f"no POPE files matching {pattern!r} in {path} "
                              "(expected e.g. coco_pope_random.json, JSON lines)")
    return {_pope_split(f): f for f in found}
  return {_pope_split(path): path}


def _pope_split(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem.rsplit("pope_", 1)[-1]


def load_pope(files: Mapping[str, PathLike] | PathLike, image_folder: PathLike,
              pattern: str = "*pope_*.json") -> list[Question]:
  """POPE: files is {split: path}, a folder (files matching `pattern`, split = the
  name after "pope_", e.g. coco_pope_random.json -> "random") or one file.

  Prompt: the question text + SHORT_SUFFIX. Answer: "yes" / "no".
  """
  folder = os.fspath(image_folder)
  questions = []
  for split, path in _pope_files(files, pattern).items():
    what = f"POPE {split!r} file (JSON lines of question_id, image, text, label)"
    for n, rec in enumerate(_load_json_lines(path, what), 1):
      rid = rec.get("question_id", f"line {n}")
      qid = f"{split}/{_field(rec, 'question_id', path, rid)}"
      label = str(_field(rec, "label", path, rid)).strip().lower()
      if label not in ("yes", "no"):
        raise ValueError(f"{path}: record {rid!r} label {rec['label']!r} is not yes/no")
      text = _field(rec, "text", path, rid, str)
      image = _image(folder, _field(rec, "image", path, rid, str), qid, "pope", path,
                     f"record {n}")
      questions.append(Question(qid, image, text + SHORT_SUFFIX, label,
                                {"split": split, "category": rec.get("category", split)}))
  return _unique_qids(questions, "POPE files")


def _binary_metrics(labels: Sequence[str], preds: Sequence[str]) -> dict:
  """accuracy, precision, recall, f1 (positive class "yes"), yes_ratio, n."""
  tp = sum(l == "yes" and p == "yes" for l, p in zip(labels, preds))
  fp = sum(l == "no" and p == "yes" for l, p in zip(labels, preds))
  tn = sum(l == "no" and p == "no" for l, p in zip(labels, preds))
  fn = sum(l == "yes" and p == "no" for l, p in zip(labels, preds))
  n = len(labels)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": (tp + fp) / n, "n": float(n)}


def score_pope(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """Per split: <split>/{accuracy,precision,recall,f1,yes_ratio,n}; headline
  accuracy, precision, recall, f1, yes_ratio = means over the splits present."""
  _check(questions, predictions, "pope")
  by_split = collections.defaultdict(lambda: ([], []))
  for q in questions:
    labels, preds = by_split[q.meta["split"]]
    labels.append(q.answer)
    preds.append(pope_yes_no(predictions[q.qid]))
  out, per = {}, []
  for split, (labels, preds) in by_split.items():
    m = _binary_metrics(labels, preds)
    per.append(m)
    out.update({f"{split}/{k}": v for k, v in m.items()})
  for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
    out[k] = _mean([m[k] for m in per])
  out["n"] = float(len(questions))
  return out


# ---------------------------------------------------------------------------
# MME.

def _images_by_stem(folder: str) -> dict[str, str]:
  out = {}
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in _IMAGE_EXTS:
      out.setdefault(stem, name)
  return out


def load_mme(root: PathLike, subtasks: Sequence[str] | None = None) -> list[Question]:
  """MME: every known subtask folder under root (or exactly `subtasks`).

  Prompt: the question as given. Answer: "yes" / "no".
  """
  root = _need_dir(root, "MME benchmark folder")
  known = MME_PERCEPTION + MME_COGNITION
  if subtasks is None:
    subtasks = [s for s in known if os.path.isdir(os.path.join(root, s))]
    if not subtasks:
      raise FileNotFoundError(f"no MME subtask folders in {root} (expected some of {known})")
  questions = []
  for task in subtasks:
    if task not in known:
      raise ValueError(f"unknown MME subtask {task!r}; known: {known}")
    tdir = _need_dir(os.path.join(root, task), f"MME subtask {task!r} folder")
    qa_dir = os.path.join(tdir, "questions_answers_YN")
    if os.path.isdir(qa_dir):
      img_dir = _need_dir(os.path.join(tdir, "images"), f"MME subtask {task!r} images folder")
    else:
      qa_dir = img_dir = tdir
    txts = sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt"))
    if not txts:
      raise ValueError(f"MME subtask {task!r}: no question .txt files in {qa_dir}")
    images = _images_by_stem(img_dir)
    group = "perception" if task in MME_PERCEPTION else "cognition"
    for txt in txts:
      stem = txt[:-len(".txt")]
      path = os.path.join(qa_dir, txt)
      lines = [(n, line) for n, line in enumerate(_read_text(path).splitlines(), 1)
               if line.strip()]
      if not lines:
        raise ValueError(f"{path}: no questions")
      if stem not in images:
        raise FileNotFoundError(f"{path}: mme question {task}/{stem}/0: image not found: "
                                f"{os.path.join(os.path.abspath(img_dir), stem)}.<jpg|png>")
      image = os.path.abspath(os.path.join(img_dir, images[stem]))
      for k, (n, line) in enumerate(lines):
        parts = line.split("\t")
        if len(parts) < 2:
          raise ValueError(f"{path}: line {n} is not 'question<TAB>answer': {line!r}")
        question, answer = parts[0].strip(), parts[1].strip().lower()
        if answer not in ("yes", "no"):
          raise ValueError(f"{path}: line {n} answer {parts[1]!r} is not Yes/No")
        questions.append(Question(f"{task}/{stem}/{k}", image, question, answer,
                                  {"subtask": task, "group": group, "image_name": stem}))
  return _unique_qids(questions, root)


def score_mme(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """Per subtask: <task>/acc (100 x questions right), <task>/acc_plus (100 x images
  with every question right), <task>/score = acc + acc_plus; perception and
  cognition = sums over the subtasks present (max 2000 and 800), total, the
  number of subtasks present per group, and other (answers neither yes nor no)."""
  _check(questions, predictions, "mme")
  tasks = collections.defaultdict(lambda: collections.defaultdict(list))
  other = 0
  for q in questions:
    pred = mme_yes_no(predictions[q.qid])
    other += pred == "other"
    tasks[q.meta["subtask"]][q.meta["image_name"]].append(pred == q.answer)
  out = {"perception": 0.0, "cognition": 0.0}
  present = collections.Counter()
  for task in MME_PERCEPTION + MME_COGNITION:
    if task not in tasks:
      continue
    per_image = tasks[task].values()
    acc = 100.0 * _mean([r for rs in per_image for r in rs])
    acc_plus = 100.0 * _mean([float(all(rs)) for rs in per_image])
    out.update({f"{task}/acc": acc, f"{task}/acc_plus": acc_plus,
                f"{task}/score": acc + acc_plus})
    group = "perception" if task in MME_PERCEPTION else "cognition"
    out[group] += acc + acc_plus
    present[group] += 1
  out["total"] = out["perception"] + out["cognition"]
  out["perception_subtasks"] = float(present["perception"])
  out["cognition_subtasks"] = float(present["cognition"])
  out["other"] = float(other)
  out["n"] = float(len(questions))
  return out


# ---------------------------------------------------------------------------
# GQA.

def load_gqa(questions_path: PathLike, image_folder: PathLike) -> list[Question]:
  """GQA (testdev balanced). Prompt: question + SHORT_SUFFIX. Answer: the short answer."""
  path = os.fspath(questions_path)
  data = _load_json(path, "GQA questions file (qid -> question)", dict)
  folder = os.fspath(image_folder)
  questions = []
  for qid, rec in data.items():
    question = _field(rec, "question", path, qid, str)
    answer = _field(rec, "answer", path, qid, str)
    rel = rec.get("image") or f"{_field(rec, 'imageId', path, qid)}.jpg"
    types = rec.get("types") if isinstance(rec.get("types"), dict) else {}
    meta = {k: types[k] for k in ("structural", "semantic", "detailed") if k in types}
    meta["full_answer"] = rec.get("fullAnswer")
    questions.append(Question(str(qid), _image(folder, rel, qid, "gqa", path),
                              question + SHORT_SUFFIX, answer, meta))
  return questions


def score_gqa(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy: exact match of gqa_normalize(prediction) with the answer; n;
  structural/<t> and detailed/<t> accuracies where the questions have types."""
  _check(questions, predictions, "gqa")
  right = [float(gqa_normalize(predictions[q.qid]) == q.answer) for q in questions]
  out = {"accuracy": _mean(right), "n": float(len(questions))}
  for kind in ("structural", "detailed"):
    _breakdown(out, kind, [q.meta.get(kind) for q in questions], right)
  return out


# ---------------------------------------------------------------------------
# VQAv2, TextVQA, VizWiz.

def _answer_strings(rec: Mapping, path: str, rid: Any) -> list[str]:
  answers = _field(rec, "answers", path, rid, list)
  out = []
  for a in answers:
    if isinstance(a, dict):
      a = a.get("answer")
    if not isinstance(a, str):
      raise ValueError(f"{path}: record {rid!r} has an answer that is not a string: {a!r}")
    out.append(a)
  if not out:
    raise ValueError(f"{path}: record {rid!r} has an empty 'answers' list")
  return out


def load_vqav2(questions_path: PathLike, annotations_path: PathLike | None,
               image_folder: PathLike, split: str | None = None) -> list[Question]:
  """VQAv2 (or any VQA-format pair). annotations_path None: answers None (test).

  Prompt: question + SHORT_SUFFIX. Answer: the human answers (list of str).
  split names the COCO files (COCO_<split>_<id:012d>.jpg); default: the
  questions file's "data_subtype".
  """
  qpath = os.fspath(questions_path)
  qdata = _load_json(qpath, "VQA questions file ({'questions': [...]})", dict)
  qs = _field(qdata, "questions", qpath, "<top level>", list)
  split = split or qdata.get("data_subtype")
  anns = {}
  if annotations_path is not None:
    apath = os.fspath(annotations_path)
    adata = _load_json(apath, "VQA annotations file ({'annotations': [...]})", dict)
    for n, a in enumerate(_field(adata, "annotations", apath, "<top level>", list)):
      anns[str(_field(a, "question_id", apath, f"annotation {n}"))] = (apath, a)
  folder = os.fspath(image_folder)
  questions = []
  for n, rec in enumerate(qs):
    qid = str(_field(rec, "question_id", qpath, f"question {n}"))
    question = _field(rec, "question", qpath, qid, str)
    if rec.get("image"):
      rel = rec["image"]
    else:
      image_id = _field(rec, "image_id", qpath, qid, int)
      if not split:
        raise ValueError(f"{qpath}: no 'data_subtype' to name COCO images; pass split=")
      rel = f"COCO_{split}_{image_id:012d}.jpg"
    answer, meta = None, {}
    if annotations_path is not None:
      if qid not in anns:
        raise ValueError(f"{os.fspath(annotations_path)}: no annotation for question {qid}")
      apath, a = anns[qid]
      answer = _answer_strings(a, apath, qid)
      meta = {k: a[k] for k in ("answer_type", "question_type", "multiple_choice_answer")
              if k in a}
    image = _image(folder, rel, qid, "vqav2", qpath, f"question {n}")
    questions.append(Question(qid, image, question + SHORT_SUFFIX, answer, meta))
  return _unique_qids(questions, qpath)


def load_textvqa(path: PathLike, image_folder: PathLike) -> list[Question]:
  """TextVQA. Prompt: question + SHORT_SUFFIX (no OCR tokens). Answer: list of str
  (None where the file has no answers, as in the test split)."""
  path = os.fspath(path)
  data = _field(_load_json(path, "TextVQA file ({'data': [...]})", dict), "data", path,
                "<top level>", list)
  folder = os.fspath(image_folder)
  questions = []
  for n, rec in enumerate(data):
    qid = str(_field(rec, "question_id", path, f"record {n}"))
    question = _field(rec, "question", path, qid, str)
    rel = f"{_field(rec, 'image_id', path, qid)}.jpg"
    answer = _answer_strings(rec, path, qid) if rec.get("answers") is not None else None
    questions.append(Question(qid, _image(folder, rel, qid, "textvqa", path, f"record {n}"),
                              question + SHORT_SUFFIX, answer, {}))
  return _unique_qids(questions, path)


def load_vizwiz(path: PathLike, image_folder: PathLike) -> list[Question]:
  """VizWiz VQA. qid = image name. Prompt: question + VIZWIZ_SUFFIX."""
  path = os.fspath(path)
  data = _load_json(path, "VizWiz annotations file (a list of records)", list)
  folder = os.fspath(image_folder)
  questions = []
  for n, rec in enumerate(data):
    qid = _field(rec, "image", path, f"record {n}", str)
    question = _field(rec, "question", path, qid, str)
    answer = _answer_strings(rec, path, qid) if rec.get("answers") is not None else None
    meta = {k: rec[k] for k in ("answer_type", "answerable") if k in rec}
    image = _image(folder, qid, qid, "vizwiz", path, f"record {n}")
    questions.append(Question(qid, image, question + VIZWIZ_SUFFIX, answer, meta))
  return _unique_qids(questions, path)


def _score_vqa(questions: Sequence[Question], predictions: Mapping[str, str], bench: str,
               normalize_answers: bool | None) -> dict:
  _check(questions, predictions, bench)
  accs = [vqa_soft_accuracy(predictions[q.qid], q.answer, normalize_answers)
          for q in questions]
  out = {"accuracy": _mean(accs), "n": float(len(questions))}
  _breakdown(out, "answer_type", [q.meta.get("answer_type") for q in questions], accs)
  return out


def score_vqav2(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy (VQA soft accuracy, 0..1), n, answer_type/<t>."""
  return _score_vqa(questions, predictions, "vqav2", None)


def score_textvqa(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy (soft accuracy, human answers always normalized, as m4c's evaluator), n."""
  return _score_vqa(questions, predictions, "textvqa", True)


def score_vizwiz(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy (VQA soft accuracy), n, answer_type/<t>."""
  return _score_vqa(questions, predictions, "vizwiz", None)


# ---------------------------------------------------------------------------
# MMBench (circular evaluation).

# The strings pandas reads as NaN (LLaVA and VLMEvalKit read the TSV with pandas).
_NA = frozenset(("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                 "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"))
_CIRCULAR_OFFSET = 1_000_000


def _present(value: str | None) -> bool:
  return value is not None and value not in _NA


def _read_tsv(path: str) -> list[dict]:
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
  for col in ("index", "question", "A", "image"):
    if col not in header:
      raise ValueError(f"{path}: no column {col!r} (header: {header})")
  return rows


def _decode_image(data: str, path: str, index: str) -> bytes:
  try:
    raw = base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError):
    raise ValueError(f"{path}: record {index!r} field 'image' is not valid base64") from None
  if not raw:
    raise ValueError(f"{path}: record {index!r} field 'image' is empty")
  return raw


def load_mmbench(tsv_path: PathLike, cache_dir: PathLike, circular: bool = True
                 ) -> list[Question]:
  """MMBench from its TSV; images decoded to cache_dir (created).

  Prompt: hint + "\n" (if any) + question + "\n" + "A. ..." lines +
  CHOICE_SUFFIX; options are the consecutive non-empty A, B, C, ... columns.
  circular: k rotated copies per question (shift s puts original option
  (j + s) % k at letter j); else shift 0 only. Answer: the letter (None if the
  file has no answer column, as the test split).
  """
  path = _need_file(tsv_path, "MMBench TSV file (index, question, hint, A, B, ..., image)")
  rows = _read_tsv(path)
  indices = [r["index"] for r in rows]
  if len(set(indices)) != len(indices):
    dup = [k for k, c in collections.Counter(indices).items() if c > 1]
    raise ValueError(f"{path}: duplicate index {_show(dup)}")
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
    options = []
    for letter in LETTERS:
      if not _present(row.get(letter)):
        break
      options.append(row[letter])
    if not options:
      raise ValueError(f"{path}: record {index!r} has no field 'A' (no options)")
    answer = row.get("answer")
    if _present(answer):
      answer = answer.strip()
      if answer not in LETTERS[:len(options)]:
        raise ValueError(f"{path}: record {index!r} answer {answer!r} is not one of its "
                         f"options {LETTERS[:len(options)]}")
    else:
      answer = None
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
    hint = row.get("hint")
    stem = (f"{hint}\n" if _present(hint) else "") + question
    k = len(options)
    meta = {"index": index, "question": question}
    for col, key in (("category", "category"), ("l2-category", "l2_category")):
      meta[key] = row[col] if _present(row.get(col)) else None
    for shift in range(k if circular else 1):
      rotated = options[shift:] + options[:shift]
      letter = None if answer is None else LETTERS[(LETTERS.index(answer) - shift) % k]
      prompt = f"{stem}\n{_options_text(rotated)}{CHOICE_SUFFIX}"
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
  return parse_letter(text, len(options))


def score_mmbench(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy = circular_accuracy (a question counts if every rotation is right),
  single_accuracy (shift 0 only), category/<c> and l2_category/<c> circular
  accuracies, unparsed (answers picking no option), n (original questions)."""
  _check(questions, predictions, "mmbench")
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
                     + _show(i for i in order if 0 not in groups[i]))
  circ = [float(all(groups[i].values())) for i in order]
  single = [float(groups[i][0]) for i in order]
  out = {"accuracy": _mean(circ), "circular_accuracy": _mean(circ),
         "single_accuracy": _mean(single), "unparsed": float(unparsed), "n": float(len(order))}
  _breakdown(out, "category", [metas[i]["category"] for i in order], circ)
  _breakdown(out, "l2_category", [metas[i]["l2_category"] for i in order], circ)
  return out


# ---------------------------------------------------------------------------
# The built-in synthetic held-out questions (data/synthetic.py writes eval.json).

def load_synthetic(json_path: PathLike, image_folder: PathLike) -> list[Question]:
  """eval.json of the built-in set: LLaVA records with "type" and "answer" fields;
  image paths relative to image_folder. qid = the record's "id"."""
  path = os.fspath(json_path)
  folder = os.fspath(image_folder)
  out = []
  for n, rec in enumerate(_load_json(path, "synthetic eval JSON", list)):
    rid = _field(rec, "id", path, n)
    turns = _field(rec, "conversations", path, rid, list)
    if not turns:
      raise ValueError(f"{path}: record {rid!r} has an empty 'conversations' list")
    question = _field(turns[0], "value", path, rid, str)
    question = question.replace("<image>\n", "").replace("<image>", "")
    qid = str(rid)
    image = _image(folder, _field(rec, "image", path, rid, str), qid, "synthetic", path,
                   f"record {n}")
    meta = {"type": _field(rec, "type", path, rid), "subtype": rec.get("subtype")}
    if "n_options" in rec:
      meta["n_options"] = rec["n_options"]
    out.append(Question(qid, image, question, str(_field(rec, "answer", path, rid)), meta))
  return _unique_qids(out, path)


def score_synthetic(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy: exact match of gqa_normalize(prediction) with the lower-cased answer; n;
  type/<t> per question type."""
  _check(questions, predictions, "synthetic")
  right = [float(gqa_normalize(predictions[q.qid]) == q.answer.lower()) for q in questions]
  out = {"accuracy": _mean(right), "n": float(len(questions))}
  _breakdown(out, "type", [q.meta["type"] for q in questions], right)
  return out


# ---------------------------------------------------------------------------
# Baselines: what a model scores without using the image.

# The metric each benchmark is summarised by (plots, tables, baselines).
HEADLINE = {"synthetic": "accuracy", "pope": "f1", "scienceqa": "accuracy", "mme": "perception",
            "gqa": "accuracy", "vqav2": "accuracy", "textvqa": "accuracy",
            "vizwiz": "accuracy", "mmbench": "accuracy"}
_FORM_WORDS = 3


def question_prefix(text: str, words: int = _FORM_WORDS) -> str:
  """The normalised opening of a question: its first line, lower case, letters and
  digits only, "an" as "a", the first `words` words ("Is there an apple in the image?"
  -> "is there a")."""
  tokens = re.findall(r"[a-z0-9]+", text.split("\n")[0].lower())
  return " ".join("a" if t == "an" else t for t in tokens[:words])


def _question_text(q: Question) -> str:
  """The question itself (no context, options or suffix)."""
  return q.meta.get("question") or q.prompt


def _form(q: Question, bench: str) -> tuple:
  """The form of a question an image-blind guesser may condition on (see `baselines`)."""
  prefix = question_prefix(_question_text(q))
  if bench == "pope":
    return (q.meta.get("split"), prefix)
  if bench == "mme":
    return (q.meta.get("subtask"), prefix)
  if bench == "scienceqa":
    return (len(q.meta["choices"]), prefix)
  if bench == "mmbench":
    return (len(q.meta["options"]), prefix)
  if bench == "vqav2" and q.meta.get("question_type"):
    return (q.meta["question_type"],)
  if bench == "gqa" and q.meta.get("detailed"):
    return (q.meta["detailed"],)
  return (prefix,)


def _reference(q: Question) -> str:
  """The single answer a guesser would give for q: the answer, or for VQA-style
  questions (human answer lists) the file's "multiple_choice_answer", else the most
  frequent normalised human answer (ties: the first given)."""
  if isinstance(q.answer, str):
    return q.answer
  if q.meta.get("multiple_choice_answer"):
    return str(q.meta["multiple_choice_answer"])
  return collections.Counter(normalize_vqa_answer(a) for a in q.answer).most_common(1)[0][0]


def _majority_by_form(questions: Sequence[Question], bench: str) -> dict[str, str]:
  """qid -> the most frequent reference answer among the questions of its form. Ties go
  to the answer more frequent in the whole benchmark, then to the one seen first."""
  answers = [_reference(q) for q in questions]
  overall = collections.Counter(answers)
  first = {}
  for i, a in enumerate(answers):
    first.setdefault(a, i)
  forms = [_form(q, bench) for q in questions]
  groups = collections.defaultdict(collections.Counter)
  for f, a in zip(forms, answers):
    groups[f][a] += 1
  best = {f: max(c, key=lambda a, c=c: (c[a], overall[a], -first[a]))
          for f, c in groups.items()}
  return {q.qid: best[f] for q, f in zip(questions, forms)}


def _need_answers(questions: Sequence[Question], bench: str) -> None:
  if not questions:
    raise ValueError(f"{bench}: no questions for a baseline")
  no_ref = [q.qid for q in questions if q.answer is None]
  if no_ref:
    raise ValueError(f"{bench}: {len(no_ref)} questions have no reference answer, so no "
                     f"baseline: {_show(no_ref)}")


def _chance(questions: Sequence[Question], bench: str) -> float:
  """The headline metric expected from uniform guessing (see `baselines`)."""
  if bench == "pope":
    return score_pope(questions, {q.qid: "yes" for q in questions})["f1"]
  if bench == "scienceqa":
    return _mean([1.0 / len(q.meta["choices"]) for q in questions])
  if bench == "mmbench":
    rotations = collections.Counter(q.meta["index"] for q in questions)
    k = {q.meta["index"]: len(q.meta["options"]) for q in questions}
    return _mean([(1.0 / k[i]) ** r for i, r in rotations.items()])
  if bench == "mme":
    per_image = collections.defaultdict(lambda: collections.defaultdict(int))
    for q in questions:
      if q.meta["subtask"] in MME_PERCEPTION:
        per_image[q.meta["subtask"]][q.meta["image_name"]] += 1
    return sum(50.0 + 100.0 * _mean([0.5 ** n for n in images.values()])
               for images in per_image.values())
  return 0.0  # Open-ended answers: a uniform guess over all strings is never right.


def _baselines(questions: Sequence[Question], bench: str) -> dict:
  _need_answers(questions, bench)
  score = BENCHMARKS[bench].score
  blind = score(questions, _majority_by_form(questions, bench))[HEADLINE[bench]]
  return {"chance": float(_chance(questions, bench)), "image_blind": float(blind)}


def baselines_synthetic(questions: Sequence[Question]) -> dict:
  """Both baselines from `data.synthetic.chance_rates` (per type, weighted by counts)."""
  _need_answers(questions, "synthetic")
  records = [dict(q.meta, answer=q.answer.lower()) for q in questions]
  rates = synthetic.chance_rates(records)
  counts = collections.Counter(r["type"] for r in records)
  def overall(per_type):
    return sum(per_type[t] * n for t, n in counts.items()) / len(records)
  return {"chance": overall(rates["uniform"]), "image_blind": overall(rates["majority"])}


def baselines(bench: str, questions: Sequence[Question]) -> dict:
  """Reference scores for `questions` of benchmark `bench`, in its headline metric
  (`HEADLINE`): {"chance": x, "image_blind": y}.

  chance: the expected score of uniform guessing among the allowed answers. POPE:
    the F1 of answering "yes" always, since F1 counts "yes" as positive (uniform
    yes/no guessing has accuracy 0.5); ScienceQA: the mean of 1 / number of options;
    MMBench: the mean of (1 / options) ** rotations (circular: every rotation
    right); MME: each question right with probability 0.5, so per perception subtask
    50 (acc) + 100 x mean over images of 0.5 ** questions (acc+), summed; open-ended
    answers (GQA, VQAv2, TextVQA, VizWiz): 0. The synthetic set: the mean of
    1 / possible answers (`data.synthetic.chance_rates`, "uniform").
  image_blind: the score, by the benchmark's own scorer, of a guesser that never sees
    the image and answers each question with the most frequent reference answer among
    the questions of its form. The form is the normalised question prefix
    (`question_prefix`: the first 3 words, so "Is there a <object> in the image?"
    is one form), with the split (POPE), subtask (MME) or number of options
    (ScienceQA, MMBench) beside it; VQAv2's "question_type" or GQA's "detailed" type
    where the file gives one. A VQA-style question's reference is its
    "multiple_choice_answer", else its most frequent human answer. Ties go to the
    answer more frequent in the whole benchmark, then to the one seen first. The
    answer prior is fitted on the evaluated questions themselves, so this is the best
    such guesser could do. The synthetic set: `data.synthetic.chance_rates`
    ("majority", per type/subtype or number of options).

  Raises ValueError for an unknown benchmark, no questions, or questions without
  reference answers.
  """
  if bench not in BASELINES:
    raise ValueError(f"no baselines for benchmark {bench!r}; known: {', '.join(BASELINES)}")
  return BASELINES[bench](questions)


def _per_bench(bench: str) -> Callable[[Sequence[Question]], dict]:
  def fn(questions: Sequence[Question]) -> dict:
    return _baselines(questions, bench)
  fn.__name__ = f"baselines_{bench}"
  fn.__doc__ = f"`baselines` for {bench}: {{'chance': x, 'image_blind': y}}."
  return fn


baselines_scienceqa = _per_bench("scienceqa")
baselines_pope = _per_bench("pope")
baselines_mme = _per_bench("mme")
baselines_gqa = _per_bench("gqa")
baselines_vqav2 = _per_bench("vqav2")
baselines_textvqa = _per_bench("textvqa")
baselines_vizwiz = _per_bench("vizwiz")
baselines_mmbench = _per_bench("mmbench")


# ---------------------------------------------------------------------------

class Benchmark(NamedTuple):
  """A benchmark's loader (arguments differ per benchmark) and scorer."""
  load: Callable[..., list[Question]]
  score: Callable[[Sequence[Question], Mapping[str, str]], dict]


BENCHMARKS = {
    "synthetic": Benchmark(load_synthetic, score_synthetic),
    "scienceqa": Benchmark(load_scienceqa, score_scienceqa),
    "pope": Benchmark(load_pope, score_pope),
    "mme": Benchmark(load_mme, score_mme),
    "gqa": Benchmark(load_gqa, score_gqa),
    "vqav2": Benchmark(load_vqav2, score_vqav2),
    "textvqa": Benchmark(load_textvqa, score_textvqa),
    "vizwiz": Benchmark(load_vizwiz, score_vizwiz),
    "mmbench": Benchmark(load_mmbench, score_mmbench),
}


# name -> baselines(questions) -> {"chance": x, "image_blind": y} (see `baselines`).
BASELINES = {
    "synthetic": baselines_synthetic,
    "scienceqa": baselines_scienceqa,
    "pope": baselines_pope,
    "mme": baselines_mme,
    "gqa": baselines_gqa,
    "vqav2": baselines_vqav2,
    "textvqa": baselines_textvqa,
    "vizwiz": baselines_vizwiz,
    "mmbench": baselines_mmbench,
}
