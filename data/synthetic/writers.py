"""Writes the synthetic set as files: images, LLaVA JSON splits and held-out benchmark files.

`generate(out_dir)` writes every split (layout in its docstring) and
dataset_info.json; `main` is its command line (`python -m data.synthetic`).
"""
import argparse
import collections
import contextlib
import json
import os
import time

from data.synthetic.questions import IMAGE_TYPES, NEG_KINDS, chance_rates
from data.synthetic.samples import (BUILDERS, gqa_question, image_path, pope_image, sqa_problem,
                                    vqa_image)
from data.synthetic.scenes import (COLOR_WEIGHTS, COLORS, COMBO_RANK, GRID, MAX_OBJECTS,
                                   SHAPE_WEIGHTS, SHAPES, SIZES, Scene, png_bytes, render)

TRAIN_SPLITS = ("captions", "instruct")
HELDOUT_SPLITS = ("eval", "pope", "scienceqa", "vqa", "gqa")


class _Writer:
  """Renders and saves the images of one generation (counting them per split), writes its
  JSON files, and times each split."""

  def __init__(self, out_dir: str, seed: int, image_size: int):
    self.out_dir, self.seed, self.image_size = out_dir, seed, image_size
    self.count = collections.Counter()
    self.timing = {}

  def save(self, split: str, index: int, scene: Scene):
    with open(os.path.join(self.out_dir, image_path(split, index)), "wb") as f:
      f.write(png_bytes(render(scene, self.image_size)))
    self.count[split] += 1

  def dump(self, name: str, obj):
    """Writes `obj` as compact JSON to `name` under out_dir (its folder made if needed)."""
    path = os.path.join(self.out_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(obj, f, indent=None, separators=(",", ":"))

  @contextlib.contextmanager
  def timed(self, split: str):
    t = time.perf_counter()
    yield
    self.timing[split] = time.perf_counter() - t

  def records(self, split: str, kind: str, n: int) -> list:
    """Records 0 .. n-1 of `split` (built as `kind`), their images saved."""
    with self.timed(split):
      recs = []
      for i in range(n):
        rec, scene = BUILDERS[kind](self.seed, split, i, self.image_size)
        if scene is not None:
          self.save(split, i, scene)
        recs.append(rec)
    return recs


def _gqa_full_answer(q: dict) -> str:
  stem = q["question"].rstrip("?")
  if q["subtype"] in ("horizontal", "vertical"):
    a, b = stem[len("Is the "):].split(" to the left or right of " if q["subtype"] == "horizontal"
                                       else " above or below ")
    rel = {"left": "to the left of", "right": "to the right of", "above": "above",
           "below": "below"}[q["answer"]]
    return f"The {a} is {rel} {b}."
  return f"The {stem[len('What color is the '):]} is {q['answer']}."


def _write_pope(w: _Writer, n: int) -> dict:
  """POPE: the same images and positives in all three files, negatives per kind.
  -> {neg_kind: [question, ...]} (at least n questions each)."""
  pope = {k: [] for k in NEG_KINDS}
  index = 0
  while len(pope["random"]) < n:
    qs, scene = pope_image(w.seed, index, w.image_size)
    w.save("pope", index, scene)
    for kind in NEG_KINDS:
      for text, label, combo in qs[kind]:
        pope[kind].append({"question_id": len(pope[kind]), "image": image_path("pope", index),
                           "text": text, "label": label, "category": kind,
                           "object": " ".join(combo)})
    index += 1
  for kind in NEG_KINDS:
    path = os.path.join(w.out_dir, "pope", f"synthetic_pope_{kind}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.writelines(json.dumps(q) + "\n" for q in pope[kind])
  return pope


def _write_scienceqa(w: _Writer, n: int) -> dict:
  """ScienceQA: the release's problems.json / pid_splits.json, and LLaVA's question file.
  -> problems ({pid: problem})."""
  problems, llava_sqa = {}, []
  for i in range(n):
    q, scene = sqa_problem(w.seed, i, w.image_size)
    w.save("scienceqa", i, scene)
    pid, img = str(i), image_path("scienceqa", i)
    problems[pid] = {"question": q["stem"], "choices": q["choices"], "answer": q["answer_index"],
                     "hint": "", "image": img, "task": "closed choice", "grade": "grade1",
                     "subject": "natural science", "topic": "shapes", "category": q["subtype"],
                     "skill": q["subtype"], "lecture": "", "solution": "", "split": "test"}
    llava_sqa.append({"id": pid, "image": img, "conversations": [
        {"from": "human", "value": "<image>\n" + q["question"]},
        {"from": "gpt", "value": q["answer"]}]})
  w.dump(os.path.join("scienceqa", "problems.json"), problems)
  w.dump(os.path.join("scienceqa", "pid_splits.json"), {"test": list(problems)})
  w.dump(os.path.join("scienceqa", "llava_test.json"), llava_sqa)
  return problems


def _write_vqa(w: _Writer, n: int) -> list:
  """VQAv2 style: two questions per image, ten (agreeing) human answers each.
  -> the annotations (one per question)."""
  questions, annotations = [], []
  for i in range((n + 1) // 2):
    qs, scene = vqa_image(w.seed, i, w.image_size)
    w.save("vqa", i, scene)
    for j, (qtype, answer_type, q) in enumerate(qs):
      qid = i * 10 + j
      questions.append({"image_id": i, "question": q["question"].split("\n")[0],
                        "question_id": qid, "image": image_path("vqa", i)})
      annotations.append({
          "question_id": qid, "image_id": i, "answer_type": answer_type,
          "question_type": qtype, "multiple_choice_answer": q["answer"],
          "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": k + 1}
                      for k in range(10)]})
  w.dump(os.path.join("vqa", "questions.json"),
         {"info": {"description": "mqt synthetic"}, "task_type": "Open-Ended",
          "data_type": "synthetic", "data_subtype": "test", "questions": questions})
  w.dump(os.path.join("vqa", "annotations.json"),
         {"info": {"description": "mqt synthetic"}, "data_type": "synthetic",
          "data_subtype": "test", "annotations": annotations})
  return annotations


def _write_gqa(w: _Writer, n: int) -> dict:
  """GQA style: colour and position questions. -> {question id: question}."""
  gqa = {}
  for i in range(n):
    (qtype, q), scene = gqa_question(w.seed, i, w.image_size)
    w.save("gqa", i, scene)
    gqa[str(i)] = {"imageId": str(i), "image": image_path("gqa", i), "question": q["question"],
                   "answer": q["answer"], "fullAnswer": _gqa_full_answer(q),
                   "isBalanced": True,
                   "types": {"structural": "choose" if qtype == "position" else "query",
                             "semantic": "rel" if qtype == "position" else "attr",
                             "detailed": qtype}}
  w.dump(os.path.join("gqa", "testdev_balanced_questions.json"), gqa)
  return gqa


def generate(out_dir: str, seed: int = 0, image_size: int = 64, n_caption: int = 4000,
             n_instruct: int = 12000, n_eval_per_type: int = 100) -> dict:
  """Writes the whole dataset under out_dir; returns dataset_info (also written).

  Layout (image paths in every file are relative to out_dir):
    images/<split>/<index>.png         splits: captions instruct eval pope scienceqa vqa gqa
    captions.json, instruct.json       stage 1 / stage 2 training (LLaVA format)
    eval.json                          held out, n_eval_per_type records per type
    pope/synthetic_pope_{random,popular,adversarial}.json   JSON lines
    scienceqa/problems.json, pid_splits.json, llava_test.json
    vqa/questions.json, vqa/annotations.json               (VQAv2 style)
    gqa/testdev_balanced_questions.json                    (colour + position)
    dataset_info.json                  counts, settings, chance rates
  Chance ("chance"): per type, the accuracy of an image-blind guesser that
  answers the most frequent eval answer for the question's form (type and
  subtype; for choice, the number of options); "chance_uniform": the mean
  1 / #possible answers. The returned dict has "_timing" too: seconds per split.
  """
  t0 = time.perf_counter()
  for split in TRAIN_SPLITS + HELDOUT_SPLITS:
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
  w = _Writer(out_dir, seed, image_size)
  splits = {"captions": w.records("captions", "caption", n_caption),
            "instruct": w.records("instruct", "instruct", n_instruct),
            "eval": w.records("eval", "eval", n_eval_per_type * len(IMAGE_TYPES))}
  for split, recs in splits.items():
    w.dump(f"{split}.json", recs)
  writers = {"pope": _write_pope, "scienceqa": _write_scienceqa, "vqa": _write_vqa,
             "gqa": _write_gqa}
  bench = {}
  for name, write in writers.items():
    with w.timed(name):
      bench[name] = write(w, n_eval_per_type)
  info = _dataset_info(w, splits, bench)
  w.dump("dataset_info.json", info)
  w.timing["total"] = time.perf_counter() - t0
  info["_timing"] = w.timing
  return info


def _dataset_info(w: _Writer, splits: dict, bench: dict) -> dict:
  """dataset_info.json: settings, counts, chance rates of `splits` ({split: records}) and
  of the benchmark files (`bench`: what each `_write_*` returned)."""
  pope, problems, annotations, gqa = (bench[k] for k in ("pope", "scienceqa", "vqa", "gqa"))
  instruct, evals = splits["instruct"], splits["eval"]
  rates = chance_rates(evals)
  yes_rate = sum(q["label"] == "yes" for q in pope["random"]) / max(1, len(pope["random"]))
  return {
      "name": "mqt_synthetic", "seed": w.seed, "image_size": w.image_size, "grid": GRID,
      "max_objects": MAX_OBJECTS, "colors": list(COLORS), "shapes": list(SHAPES),
      "sizes": list(SIZES), "color_weights": list(COLOR_WEIGHTS),
      "shape_weights": list(SHAPE_WEIGHTS),
      "popular_combos": [" ".join(c) for c in COMBO_RANK[:10]],
      "types": list(IMAGE_TYPES),
      "counts": {
          "captions": len(splits["captions"]), "instruct": len(instruct), "eval": len(evals),
          "instruct_by_type": dict(sorted(collections.Counter(r["type"] for r in instruct)
                                          .items())),
          "eval_by_type": dict(sorted(collections.Counter(r["type"] for r in evals).items())),
          "pope": {k: len(v) for k, v in pope.items()}, "scienceqa": len(problems),
          "vqa": len(annotations), "gqa": len(gqa), "images": dict(sorted(w.count.items())),
      },
      "chance": rates["majority"],
      "chance_uniform": rates["uniform"],
      "chance_note": ("chance: accuracy of an image-blind guesser answering the most frequent "
                      "eval answer for the question's form (type/subtype; choice: #options). "
                      "chance_uniform: mean of 1/#possible answers."),
      "benchmark_chance": {
          "pope": {"accuracy_always_yes": yes_rate,
                   "f1_always_yes": 2 * yes_rate / (1 + yes_rate) if yes_rate else 0.0},
          "scienceqa": sum(1 / len(p["choices"]) for p in problems.values())
                       / max(1, len(problems)),
          "vqa": _majority([(a["question_type"], a["multiple_choice_answer"])
                            for a in annotations]),
          "gqa": _majority([(v["types"]["detailed"], v["answer"]) for v in gqa.values()]),
      },
  }


def _majority(pairs) -> float:
  """Majority-answer rate within groups: pairs of (group, answer)."""
  groups = collections.defaultdict(collections.Counter)
  for g, a in pairs:
    groups[g][a] += 1
  return sum(max(c.values()) for c in groups.values()) / max(1, len(pairs))


def main(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m data.synthetic",
      description="A built-in synthetic vision-language dataset: coloured shapes on a 3x3 grid.")
  p.add_argument("--out_dir", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--n_caption", type=int, default=4000)
  p.add_argument("--n_instruct", type=int, default=12000)
  p.add_argument("--n_eval_per_type", type=int, default=100)
  args = p.parse_args(argv)
  info = generate(args.out_dir, seed=args.seed, image_size=args.image_size,
                  n_caption=args.n_caption, n_instruct=args.n_instruct,
                  n_eval_per_type=args.n_eval_per_type)
  timing = info.pop("_timing")
  images = sum(info["counts"]["images"].values())
  print(json.dumps(info["counts"], indent=1))
  print("chance (majority given question form):",
        {k: round(v, 3) for k, v in info["chance"].items()})
  print("chance (uniform):", {k: round(v, 3) for k, v in info["chance_uniform"].items()})
  print("seconds per split:", {k: round(v, 2) for k, v in timing.items()})
  print(f"{images} images + records in {timing['total']:.1f}s "
        f"({images / timing['total']:.0f} samples/s) -> {args.out_dir}")
