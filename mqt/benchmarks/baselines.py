"""What a model scores without using the image: a benchmark's "chance" and "image_blind"
baselines in its headline metric, for drawing beside the model's.

chance: the expected score of uniform guessing among the allowed answers (each
  benchmark's `Benchmark.chance`; see its module), or the caller's own where it knows
  the answer sets better (the built-in synthetic set's come from its generator).
image_blind: the score, by the benchmark's own scorer, of a guesser that never sees
  the image and answers each question with the most frequent reference answer among
  the questions of its form. The form is the normalised question prefix
  (`question_prefix`: the first 3 words, so "Is there a <object> in the image?" is one
  form) with what the benchmark adds beside it (`Benchmark.form`: e.g. POPE's split,
  the number of options). A VQA-style question's reference is its
  "multiple_choice_answer", else its most frequent human answer. Ties go to the answer
  more frequent in the whole benchmark, then to the one seen first. The answer prior is
  fitted on the evaluated questions themselves, so this is the best such a guesser
  could do.
"""
import collections
import re
from typing import Callable, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import Benchmark, Question
from mqt.benchmarks.vqa_answers import normalize_vqa_answer

_FORM_WORDS = 3

Chance = Callable[[Sequence[Question]], float | None]


def question_prefix(text: str, words: int = _FORM_WORDS) -> str:
  """The normalised opening of a question: its first line, lower case, letters and
  digits only, "an" as "a", the first `words` words ("Is there an apple in the image?"
  -> "is there a")."""
  tokens = re.findall(r"[a-z0-9]+", text.split("\n")[0].lower())
  return " ".join("a" if t == "an" else t for t in tokens[:words])


def _question_text(q: Question) -> str:
  """The question itself (no context, options or suffix)."""
  return q.meta.get("question") or q.prompt


def _reference(q: Question) -> str:
  """The single answer a guesser would give for q: the answer, or for VQA-style
  questions (human answer lists) the file's "multiple_choice_answer", else the most
  frequent normalised human answer (ties: the first given)."""
  if isinstance(q.answer, str):
    return q.answer
  if q.meta.get("multiple_choice_answer"):
    return str(q.meta["multiple_choice_answer"])
  return collections.Counter(normalize_vqa_answer(a) for a in q.answer).most_common(1)[0][0]


def majority_by_form(questions: Sequence[Question], bench: Benchmark) -> dict[str, str]:
  """qid -> the most frequent reference answer among the questions of its form. Ties go
  to the answer more frequent in the whole benchmark, then to the one seen first."""
  answers = [_reference(q) for q in questions]
  overall = collections.Counter(answers)
  first = {}
  for i, a in enumerate(answers):
    first.setdefault(a, i)
  forms = [bench.form(q, question_prefix(_question_text(q))) for q in questions]
  groups = collections.defaultdict(collections.Counter)
  for f, a in zip(forms, answers):
    groups[f][a] += 1
  best = {f: max(c, key=lambda a, c=c: (c[a], overall[a], -first[a]))
          for f, c in groups.items()}
  return {q.qid: best[f] for q, f in zip(questions, forms)}


def baselines(bench: Benchmark, questions: Sequence[Question], chance: Chance | None = None
              ) -> dict:
  """-> {"chance": x or None, "image_blind": y} for `questions` of `bench`, in its
  headline metric; `chance` (questions -> x) replaces the benchmark's own.

  Raises ValueError for no questions or questions without reference answers.
  """
  common.need_answers(questions, bench.name, "for a baseline")
  blind = bench.score(questions, majority_by_form(questions, bench))[bench.headline]
  rate = (chance or bench.chance)(questions)
  return {"chance": None if rate is None else float(rate), "image_blind": float(blind)}
