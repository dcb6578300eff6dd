"""MME: yes/no questions in 14 subtasks (10 perception, 4 cognition), two per image.

Files: <root>/<subtask>/ with either images/ + questions_answers_YN/<name>.txt, or
<name>.<jpg|png> next to <name>.txt; each txt line "question\\tYes|No".
qid "<subtask>/<name>/<line number from 0>". Prompt: the question as given; answers
are read with MME's calculation.py rule (`mme_yes_no`). Headline: perception (the sum
over the perception subtasks of acc + acc+, at most 2000); chance: each question right
with probability 0.5, so per perception subtask 50 (acc) + 100 x the mean over images of
0.5 ** questions (acc+), summed. Config: config.eval.benchmarks.mme.root.
"""
import collections
import os
from typing import Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import Benchmark, PathLike, Question

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _images_by_stem(folder: str) -> dict[str, str]:
  out = {}
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in _IMAGE_EXTS:
      out.setdefault(stem, name)
  return out


def _subtask_questions(root: str, task: str) -> list[Question]:
  tdir = common.need_dir(os.path.join(root, task), f"MME subtask {task!r} folder")
  qa_dir = os.path.join(tdir, "questions_answers_YN")
  if os.path.isdir(qa_dir):
    img_dir = common.need_dir(os.path.join(tdir, "images"),
                              f"MME subtask {task!r} images folder")
  else:
    qa_dir = img_dir = tdir
  txts = sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt"))
  if not txts:
    raise ValueError(f"MME subtask {task!r}: no question .txt files in {qa_dir}")
  images = _images_by_stem(img_dir)
  group = "perception" if task in MME_PERCEPTION else "cognition"
  questions = []
  for txt in txts:
    stem = txt[:-len(".txt")]
    path = os.path.join(qa_dir, txt)
    lines = [(n, line) for n, line in enumerate(common.read_text(path).splitlines(), 1)
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
  return questions


def load_mme(root: PathLike, subtasks: Sequence[str] | None = None) -> list[Question]:
  """MME: every known subtask folder under root (or exactly `subtasks`).

  Prompt: the question as given. Answer: "yes" / "no".
  """
  root = common.need_dir(root, "MME benchmark folder")
  known = MME_PERCEPTION + MME_COGNITION
  if subtasks is None:
    subtasks = [s for s in known if os.path.isdir(os.path.join(root, s))]
    if not subtasks:
      raise FileNotFoundError(f"no MME subtask folders in {root} (expected some of {known})")
  questions = []
  for task in subtasks:
    if task not in known:
      raise ValueError(f"unknown MME subtask {task!r}; known: {known}")
    questions += _subtask_questions(root, task)
  return common.unique_qids(questions, root)


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


def score_mme(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """Per subtask: <task>/acc (100 x questions right), <task>/acc_plus (100 x images
  with every question right), <task>/score = acc + acc_plus; perception and
  cognition = sums over the subtasks present (max 2000 and 800), total, the
  number of subtasks present per group, and other (answers neither yes nor no)."""
  common.check(questions, predictions, "mme")
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
    acc = 100.0 * common.mean([r for rs in per_image for r in rs])
    acc_plus = 100.0 * common.mean([float(all(rs)) for rs in per_image])
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


def _chance(questions: Sequence[Question]) -> float:
  per_image = collections.defaultdict(lambda: collections.defaultdict(int))
  for q in questions:
    if q.meta["subtask"] in MME_PERCEPTION:
      per_image[q.meta["subtask"]][q.meta["image_name"]] += 1
  return sum(50.0 + 100.0 * common.mean([0.5 ** n for n in images.values()])
             for images in per_image.values())


BENCHMARK = Benchmark(
    name="mme", load=load_mme, score=score_mme, headline="perception", fields={"root": ""},
    from_config=lambda b, workdir: load_mme(b.root),
    form=lambda q, prefix: (q.meta.get("subtask"), prefix), chance=_chance)
