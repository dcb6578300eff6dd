"""ScienceQA-IMG: multiple-choice science questions that have an image.

Files: problems.json {pid: {"question", "choices": [...], "answer": int, "hint",
"image": file name or null, "split", "subject", ...}} and pid_splits.json {"test":
[pid, ...]}. Only problems with an image are kept (the IMG subset). The image is the
first file found of <folder>/<split>/<pid>/<image> (the release), <folder>/<pid>/<image>
(folder = images/test, as LLaVA) and <folder>/<image> (a relative path).
Prompt: "Context: <hint>\\n" (a non-blank hint) + question + "\\n" + "A. option" lines
+ "\\nAnswer with the option's letter from the given choices directly."; answers are
read with `parse_letter`. Headline: accuracy; chance: the mean of 1 / options.
Config: config.eval.benchmarks.scienceqa.problems, .pid_splits and .image_folder.
"""
import os
from typing import Mapping, Sequence

from mqt.benchmarks import common
from mqt.benchmarks.common import LETTERS, Benchmark, PathLike, Question


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

  Prompt: "Context: {hint}\\n" (only if the hint is not blank) + question +
  "\\n" + "A. ..." lines + CHOICE_SUFFIX. Answer: the correct letter.
  """
  problems = common.load_json(problems_path, "ScienceQA problems.json (pid -> problem)", dict)
  splits = common.load_json(pid_splits_path, "ScienceQA pid_splits.json (split -> [pid])", dict)
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
    question = common.field(p, "question", ppath, pid, str)
    choices = common.field(p, "choices", ppath, pid, list)
    answer = common.field(p, "answer", ppath, pid, int)
    if not 1 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
      raise ValueError(f"{ppath}: record {pid!r}: answer {answer} does not index its "
                       f"{len(choices)} choices")
    hint = str(p.get("hint") or "").strip()
    prompt = ((f"Context: {hint}\n" if hint else "") + f"{question}\n"
              + common.options_text([str(c) for c in choices]) + common.CHOICE_SUFFIX)
    image = _scienceqa_image(folder, str(p.get("split") or split), pid, str(name), ppath)
    meta = {"choices": list(choices), "answer_index": answer, "split": p.get("split", split),
            "question": question}
    meta.update({k: p[k] for k in ("subject", "grade", "category", "topic") if k in p})
    questions.append(Question(pid, image, prompt, LETTERS[answer], meta))
  return common.unique_qids(questions, ppath)


def score_scienceqa(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
  """accuracy (0..1; unparsed answers are wrong), unparsed (count), n, subject/<s>."""
  common.check(questions, predictions, "scienceqa")
  right, unparsed = [], 0
  for q in questions:
    letter = common.parse_letter(predictions[q.qid], len(q.meta["choices"]))
    unparsed += letter is None
    right.append(float(letter == q.answer))
  out = {"accuracy": common.mean(right), "unparsed": float(unparsed),
         "n": float(len(questions))}
  common.breakdown(out, "subject", [q.meta.get("subject") for q in questions], right)
  return out


def _builtin(base: str) -> list[Question]:
  folder = os.path.join(base, "scienceqa")
  return load_scienceqa(os.path.join(folder, "problems.json"),
                        os.path.join(folder, "pid_splits.json"), base)


BENCHMARK = Benchmark(
    name="scienceqa", load=load_scienceqa, score=score_scienceqa, headline="accuracy",
    fields={"problems": "", "pid_splits": "", "image_folder": ""},
    from_config=lambda b, workdir: load_scienceqa(b.problems, b.pid_splits, b.image_folder),
    from_builtin=_builtin,
    form=lambda q, prefix: (len(q.meta["choices"]), prefix),
    chance=lambda questions: common.mean([1.0 / len(q.meta["choices"]) for q in questions]))
