"""TextVQA: questions about text in images, ten human answers each.

File: {"data": [{"question_id", "question", "image_id", "answers": [str]}]}; image
<image folder>/<image_id>.jpg. Prompt: question + "\\nAnswer the question using a single
word or phrase." (no OCR tokens). Scored by the VQA soft accuracy with the human answers
always normalised, as the m4c evaluator does. Headline: accuracy; chance 0 (open-ended).
Config: config.eval.benchmarks.textvqa.json and .image_folder.
"""
import os

from mqt.benchmarks import common
from mqt.benchmarks import vqa_answers
from mqt.benchmarks.common import PathLike, Question


def load_textvqa(path: PathLike, image_folder: PathLike) -> list[Question]:
  """TextVQA. Prompt: question + SHORT_SUFFIX (no OCR tokens). Answer: list of str
  (None where the file has no answers, as in the test split)."""
  path = os.fspath(path)
  data = common.field(common.load_json(path, "TextVQA file ({'data': [...]})", dict), "data",
                      path, "<top level>", list)
  folder = os.fspath(image_folder)
  questions = []
  for n, rec in enumerate(data):
    qid = str(common.field(rec, "question_id", path, f"record {n}"))
    question = common.field(rec, "question", path, qid, str)
    rel = f"{common.field(rec, 'image_id', path, qid)}.jpg"
    answer = vqa_answers.answer_strings(rec, path, qid, optional=True)
    image = common.image(folder, rel, qid, "textvqa", path, f"record {n}")
    questions.append(Question(qid, image, question + common.SHORT_SUFFIX, answer, {}))
  return common.unique_qids(questions, path)


BENCHMARK = vqa_answers.one_file_benchmark("textvqa", load_textvqa, normalize_answers=True)
score_textvqa = BENCHMARK.score
