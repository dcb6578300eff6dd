"""The built-in synthetic held-out questions, scored by exact match per question type.

File: eval.json of the built-in set (data/synthetic.py writes it): a JSON list of LLaVA
records {"id", "image" (relative to the image folder), "conversations": [{"value":
"<image>\\n<question>"}, ...], "type", "subtype"?, "n_options"?, "answer"}. The prompt
is the first turn without "<image>" (its suffix is already in the file); qid = "id".
Headline: accuracy. The chance baseline needs the generator's answer sets, so the
caller passes it (evaluate.py does); the image-blind one conditions on the question's
type and subtype (for multiple choice, the number of options), as the generator's own.
"""
import os
from typing import Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import Benchmark, PathLike, Question


def load_synthetic(json_path: PathLike, image_folder: PathLike) -> list[Question]:
  """eval.json of the built-in set: LLaVA records with "type" and "answer" fields;
  image paths relative to image_folder. qid = the record's "id"."""
  path = os.fspath(json_path)
  folder = os.fspath(image_folder)
  out = []
  for n, rec in enumerate(common.load_json(path, "synthetic eval JSON", list)):
    rid = common.field(rec, "id", path, n)
    turns = common.field(rec, "conversations", path, rid, list)
    if not turns:
      raise ValueError(f"{path}: record {rid!r} has an empty 'conversations' list")
    question = common.field(turns[0], "value", path, rid, str)
    question = question.replace("<image>\n", "").replace("<image>", "")
    qid = str(rid)
    image = common.image(folder, common.field(rec, "image", path, rid, str), qid, "synthetic",
                         path, f"record {n}")
    meta = {"type": common.field(rec, "type", path, rid), "subtype": rec.get("subtype")}
    if "n_options" in rec:
      meta["n_options"] = rec["n_options"]
    answer = str(common.field(rec, "answer", path, rid))
    out.append(Question(qid, image, question, answer, meta))
  return common.unique_qids(out, path)


def score_synthetic(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy: exact match of gqa_normalize(prediction) with the lower-cased answer; n;
  type/<t> per question type."""
  common.check(questions, predictions, "synthetic")
  right = [float(common.gqa_normalize(predictions[q.qid]) == q.answer.lower())
           for q in questions]
  out = {"accuracy": common.mean(right), "n": float(len(questions))}
  common.breakdown(out, "type", [q.meta["type"] for q in questions], right)
  return out


def _form(q: Question, prefix: str) -> tuple:
  """The question's type and subtype; for multiple choice, the number of options."""
  del prefix
  if q.meta["type"] == "choice":
    return ("choice", q.meta.get("n_options"))
  return (q.meta["type"], q.meta.get("subtype"))


BENCHMARK = Benchmark(
    name="synthetic", load=load_synthetic, score=score_synthetic, headline="accuracy",
    from_builtin=lambda base: load_synthetic(os.path.join(base, "eval.json"), base),
    form=_form, chance=lambda questions: None)
