"""GQA (testdev balanced): short-answer questions about scene graphs.

File: testdev_balanced_questions.json {qid: {"imageId", "question", "answer",
"fullAnswer", "types": {"structural", "semantic", "detailed"}, ...}}; image
<image folder>/<imageId>.jpg, or <image folder>/<image> when the record has an "image"
field (a relative path). Prompt: question + "\\nAnswer the question using a single word
or phrase."; answers are cleaned as LLaVA's GQA conversion (`gqa_normalize`) and matched
exactly. Headline: accuracy; chance 0 (open-ended); the image-blind guesser conditions
on the "detailed" type where the file gives one.
Config: config.eval.benchmarks.gqa.questions and .image_folder.
"""
import os
from typing import Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import Benchmark, PathLike, Question


def load_gqa(questions_path: PathLike, image_folder: PathLike) -> list[Question]:
  """GQA (testdev balanced). Prompt: question + SHORT_SUFFIX. Answer: the short answer."""
  path = os.fspath(questions_path)
  data = common.load_json(path, "GQA questions file (qid -> question)", dict)
  folder = os.fspath(image_folder)
  questions = []
  for qid, rec in data.items():
    question = common.field(rec, "question", path, qid, str)
    answer = common.field(rec, "answer", path, qid, str)
    rel = rec.get("image") or f"{common.field(rec, 'imageId', path, qid)}.jpg"
    types = rec.get("types") if isinstance(rec.get("types"), dict) else {}
    meta = {k: types[k] for k in ("structural", "semantic", "detailed") if k in types}
    meta["full_answer"] = rec.get("fullAnswer")
    questions.append(Question(str(qid), common.image(folder, rel, qid, "gqa", path),
                              question + common.SHORT_SUFFIX, answer, meta))
  return questions


def score_gqa(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy: exact match of gqa_normalize(prediction) with the answer; n;
  structural/<t> and detailed/<t> accuracies where the questions have types."""
  common.check(questions, predictions, "gqa")
  right = [float(common.gqa_normalize(predictions[q.qid]) == q.answer) for q in questions]
  out = {"accuracy": common.mean(right), "n": float(len(questions))}
  for kind in ("structural", "detailed"):
    common.breakdown(out, kind, [q.meta.get(kind) for q in questions], right)
  return out


BENCHMARK = Benchmark(
    name="gqa", load=load_gqa, score=score_gqa, headline="accuracy",
    fields={"questions": "", "image_folder": ""},
    from_config=lambda b, workdir: load_gqa(b.questions, b.image_folder),
    from_builtin=lambda base: load_gqa(
        os.path.join(base, "gqa", "testdev_balanced_questions.json"), base),
    form=lambda q, prefix: (q.meta["detailed"],) if q.meta.get("detailed") else (prefix,))
