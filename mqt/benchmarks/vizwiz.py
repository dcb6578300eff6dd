"""VizWiz VQA: questions from blind users' photos, ten human answers each.

File: [{"image", "question", "answers": [{"answer", "answer_confidence"}],
"answer_type"?, "answerable"?}]; qid = the image name; image <image folder>/<image>.
Prompt: question + "\\nWhen the provided information is insufficient, respond with
'Unanswerable'." + "\\nAnswer the question using a single word or phrase.". Scored by
the VQA soft accuracy. Headline: accuracy; chance 0 (open-ended).
Config: config.eval.benchmarks.vizwiz.json and .image_folder.
"""
import os

from mqt.benchmarks import common
from mqt.benchmarks import vqa_answers
from mqt.benchmarks.common import PathLike, Question

VIZWIZ_SUFFIX = ("\nWhen the provided information is insufficient, respond with "
                 "'Unanswerable'." + common.SHORT_SUFFIX)


def load_vizwiz(path: PathLike, image_folder: PathLike) -> list[Question]:
  """VizWiz VQA. qid = image name. Prompt: question + VIZWIZ_SUFFIX."""
  path = os.fspath(path)
  data = common.load_json(path, "VizWiz annotations file (a list of records)", list)
  folder = os.fspath(image_folder)
  questions = []
  for n, rec in enumerate(data):
    qid = common.field(rec, "image", path, f"record {n}", str)
    question = common.field(rec, "question", path, qid, str)
    answer = vqa_answers.answer_strings(rec, path, qid, optional=True)
    meta = {k: rec[k] for k in ("answer_type", "answerable") if k in rec}
    image = common.image(folder, qid, qid, "vizwiz", path, f"record {n}")
    questions.append(Question(qid, image, question + VIZWIZ_SUFFIX, answer, meta))
  return common.unique_qids(questions, path)


BENCHMARK = vqa_answers.one_file_benchmark("vizwiz", load_vizwiz, normalize_answers=None)
score_vizwiz = BENCHMARK.score
