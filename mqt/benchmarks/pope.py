"""POPE: yes/no object-presence questions, one file per split (random, popular, adversarial).

Files: JSON lines (a JSON list is accepted too), one file per split, e.g.
coco_pope_random.json: {"question_id", "image", "text", "label": "yes"|"no",
"category"?}; qid "<split>/<question_id>"; image <image folder>/<image>.
Prompt: the text + "\\nAnswer the question using a single word or phrase.".
Answers are read with LLaVA's eval_pope rule (`pope_yes_no`). Headline: f1 (the mean
over the splits present); chance: the F1 of always answering "yes".
Config: config.eval.benchmarks.pope.folder (the JSON lines files) and .image_folder.
"""
import collections
import glob
import os
from typing import Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import Benchmark, PathLike, Question


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
    for n, rec in enumerate(common.load_json_lines(path, what), 1):
      rid = rec.get("question_id", f"line {n}")
      qid = f"{split}/{common.field(rec, 'question_id', path, rid)}"
      label = str(common.field(rec, "label", path, rid)).strip().lower()
      if label not in ("yes", "no"):
        raise ValueError(f"{path}: record {rid!r} label {rec['label']!r} is not yes/no")
      text = common.field(rec, "text", path, rid, str)
      image = common.image(folder, common.field(rec, "image", path, rid, str), qid, "pope",
                           path, f"record {n}")
      questions.append(Question(qid, image, text + common.SHORT_SUFFIX, label,
                                {"split": split, "category": rec.get("category", split)}))
  return common.unique_qids(questions, "POPE files")


def pope_yes_no(pred: str) -> str:
  """POPE's answer rule (LLaVA eval_pope): "no" or "yes".

  The first sentence (text before the first "."), commas removed, lower case,
  split on whitespace: "no" if a word is "no" or "not", else "yes" (so an
  empty or unrelated answer counts as "yes"; "nothing" is not "no"). LLaVA
  does not lower-case (it tests "No", "no", "not"), so "NOT" differs.
  """
  words = pred.split(".")[0].replace(",", "").lower().split()
  return "no" if ("no" in words or "not" in words) else "yes"


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
  common.check(questions, predictions, "pope")
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
    out[k] = common.mean([m[k] for m in per])
  out["n"] = float(len(questions))
  return out


def _chance(questions: Sequence[Question]) -> float:
  """The F1 of answering "yes" always: F1 counts "yes" as positive (uniform yes/no
  guessing has accuracy 0.5)."""
  return score_pope(questions, {q.qid: "yes" for q in questions})["f1"]


BENCHMARK = Benchmark(
    name="pope", load=load_pope, score=score_pope, headline="f1",
    fields={"folder": "", "image_folder": ""},  # *pope_{random,popular,adversarial}.json
    from_config=lambda b, workdir: load_pope(b.folder, b.image_folder),
    from_builtin=lambda base: load_pope(os.path.join(base, "pope"), base),
    form=lambda q, prefix: (q.meta.get("split"), prefix), chance=_chance)
