"""The official VQA answer normalization and soft accuracy (GT-Vision-Lab/VQA vqaEval.py),
shared by VQAv2, TextVQA and VizWiz, whose files hold several human answers per question."""
import re
from typing import Any, Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import Benchmark, Question

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
  return common.mean([min(1.0, (matches - (g == p)) / 3.0) for g in gts])


# ---------------------------------------------------------------------------
# Reading and scoring human answer lists.

def answer_strings(rec: Mapping, path: str, rid: Any, optional: bool = False
                   ) -> list[str] | None:
  """rec["answers"] as strings ({"answer": str} entries or str), or a ValueError naming
  the file and the record; optional: None where the record has no answers (a test
  split)."""
  if optional and rec.get("answers") is None:
    return None
  answers = common.field(rec, "answers", path, rid, list)
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


def score_vqa(questions: Sequence[Question], predictions: Mapping[str, str], bench: str,
              normalize_answers: bool | None) -> dict:
  """accuracy (mean soft accuracy, 0..1), n, answer_type/<t>."""
  common.check(questions, predictions, bench)
  accs = [vqa_soft_accuracy(predictions[q.qid], q.answer, normalize_answers)
          for q in questions]
  out = {"accuracy": common.mean(accs), "n": float(len(questions))}
  common.breakdown(out, "answer_type", [q.meta.get("answer_type") for q in questions], accs)
  return out


def one_file_benchmark(name: str, load, normalize_answers: bool | None) -> Benchmark:
  """A benchmark read from one JSON file and an image folder (config fields json and
  image_folder, loaded by `load(json, image_folder)`), scored by `score_vqa`."""
  def score(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
    return score_vqa(questions, predictions, name, normalize_answers)
  score.__doc__ = (f"accuracy (VQA soft accuracy, 0..1; human answers normalized: "
                   f"{normalize_answers}), n, answer_type/<t>.")
  return Benchmark(name=name, load=load, score=score, headline="accuracy",
                   fields={"json": "", "image_folder": ""},
                   from_config=lambda b, workdir: load(b.json, b.image_folder))
