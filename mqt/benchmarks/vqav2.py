"""VQAv2 (or any VQA-format question/annotation pair): open-ended questions, ten human
answers each, scored by the official VQA soft accuracy (mqt/benchmarks/vqa_answers.py).

Files: questions {"questions": [{"image_id", "question", "question_id", "image"?}],
"data_subtype"?} + annotations {"annotations": [{"question_id", "answers": [{"answer"},
...], "answer_type", "question_type"?, "multiple_choice_answer"?}]}; image
<image folder>/COCO_<split>_<image_id:012d>.jpg (split: the argument, else the
questions file's "data_subtype") or <image folder>/<image>. Prompt: question +
"\\nAnswer the question using a single word or phrase.". Headline: accuracy; chance 0
(open-ended); the image-blind guesser conditions on "question_type" where given.
Config: config.eval.benchmarks.vqav2.questions, .annotations and .image_folder.
"""
import os
from typing import Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks import vqa_answers
from mqt.benchmarks.common import Benchmark, PathLike, Question


def load_vqav2(questions_path: PathLike, annotations_path: PathLike | None,
               image_folder: PathLike, split: str | None = None) -> list[Question]:
  """VQAv2 (or any VQA-format pair). annotations_path None: answers None (test).

  Prompt: question + SHORT_SUFFIX. Answer: the human answers (list of str).
  split names the COCO files (COCO_<split>_<id:012d>.jpg); default: the
  questions file's "data_subtype".
  """
  qpath = os.fspath(questions_path)
  qdata = common.load_json(qpath, "VQA questions file ({'questions': [...]})", dict)
  qs = common.field(qdata, "questions", qpath, "<top level>", list)
  split = split or qdata.get("data_subtype")
  anns = {}
  if annotations_path is not None:
    apath = os.fspath(annotations_path)
    adata = common.load_json(apath, "VQA annotations file ({'annotations': [...]})", dict)
    for n, a in enumerate(common.field(adata, "annotations", apath, "<top level>", list)):
      anns[str(common.field(a, "question_id", apath, f"annotation {n}"))] = (apath, a)
  folder = os.fspath(image_folder)
  questions = []
  for n, rec in enumerate(qs):
    qid = str(common.field(rec, "question_id", qpath, f"question {n}"))
    question = common.field(rec, "question", qpath, qid, str)
    if rec.get("image"):
      rel = rec["image"]
    else:
      image_id = common.field(rec, "image_id", qpath, qid, int)
      if not split:
        raise ValueError(f"{qpath}: no 'data_subtype' to name COCO images; pass split=")
      rel = f"COCO_{split}_{image_id:012d}.jpg"
    answer, meta = None, {}
    if annotations_path is not None:
      if qid not in anns:
        raise ValueError(f"{os.fspath(annotations_path)}: no annotation for question {qid}")
      apath, a = anns[qid]
      answer = vqa_answers.answer_strings(a, apath, qid)
      meta = {k: a[k] for k in ("answer_type", "question_type", "multiple_choice_answer")
              if k in a}
    image = common.image(folder, rel, qid, "vqav2", qpath, f"question {n}")
    questions.append(Question(qid, image, question + common.SHORT_SUFFIX, answer, meta))
  return common.unique_qids(questions, qpath)


def score_vqav2(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy (VQA soft accuracy, 0..1), n, answer_type/<t>."""
  return vqa_answers.score_vqa(questions, predictions, "vqav2", None)


def _builtin(base: str) -> list[Question]:
  return load_vqav2(os.path.join(base, "vqa", "questions.json"),
                    os.path.join(base, "vqa", "annotations.json"), base)


BENCHMARK = Benchmark(
    name="vqav2", load=load_vqav2, score=score_vqav2, headline="accuracy",
    fields={"questions": "", "annotations": "", "image_folder": ""},
    from_config=lambda b, workdir: load_vqav2(b.questions, b.annotations, b.image_folder),
    from_builtin=_builtin,
    form=lambda q, prefix: ((q.meta["question_type"],) if q.meta.get("question_type")
                            else (prefix,)))
