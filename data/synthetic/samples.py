"""Samples of the synthetic set: LLaVA-format records, each a pure function of (seed, split, index).

Sample i of a split draws from its own stream (`scenes.sample_rng`), so any
sample can be regenerated alone. Record kinds: caption (stage 1), instruct
(stage 2: 1 to 4 questions about one image, or a text-only question), eval
(held out, one question with its reference "answer"); and the scenes and
questions of the held-out benchmark files (pope, scienceqa, vqa, gqa).
"""
from typing import Iterator

import numpy as np
from PIL import Image

from data.synthetic.questions import (ASK, CHOICE_SUFFIX, IMAGE_TYPES, LETTERS, NEG_KINDS,
                                      SHORT_SUFFIX, exist_question, negatives, scene_for)
from data.synthetic.scenes import (ALL_POSITIONS, COLORS, COLS, COMBOS, ROWS, SHAPES, SIZES,
                                   Scene, caption, choose, draw_scene, pick, plural, render,
                                   sample_rng)

SHUFFLE_CAPTIONS = True
TEXT_FRACTION = 0.06  # Text-only instruct samples; the rest are about an image.
# Questions per image conversation (as LLaVA's VQAv2 data groups an image's
# questions): a one-word answer is 2 supervised tokens, so one question per
# 80-token sample would spend almost all the compute on the prompt.
TURN_WEIGHTS = ((1, 0.15), (2, 0.2), (3, 0.3), (4, 0.35))
TURN_CHAR_BUDGET = 300  # Characters of question text per conversation (~fits max_len 160).
CAPTION_REQUESTS = (
    "Describe the image briefly.",
    "Give a short description of this picture.",
    "What is in this image?",
    "Write a brief caption for the image.",
    "Summarize the visual content of the image.",
)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")

SPLIT_KINDS = {"captions": "caption", "instruct": "instruct", "eval": "eval"}


def image_path(split: str, index: int) -> str:
  return f"images/{split}/{index}.png"


def _question_text(q: dict, suffix: bool) -> str:
  """A question as asked: with the short-answer suffix appended when `suffix`."""
  return q["question"] + (f"\n{SHORT_SUFFIX}" if suffix else "")


def _single(rid: str, split: str, index: int, t: str, q: dict, suffix: bool) -> dict:
  text = _question_text(q, suffix)
  rec = {"id": rid, "image": image_path(split, index),
         "conversations": [{"from": "human", "value": "<image>\n" + text},
                           {"from": "gpt", "value": q["answer"]}],
         "type": t}
  rec.update({k: v for k, v in q.items() if k != "question"})
  return rec


def _text_only(rid: str, rng) -> dict:
  kind = int(rng.integers(5))
  a, b = int(rng.integers(10)), int(rng.integers(10))
  if kind == 0:
    q, ans, sub = f"What is {a} plus {b}?", str(a + b), "add"
  elif kind == 1:
    a, b = max(a, b), min(a, b)
    q, ans, sub = f"What is {a} minus {b}?", str(a - b), "subtract"
  elif kind == 2:
    b = (a + 1 + int(rng.integers(9))) % 10
    q, ans, sub = f"Which number is larger, {a} or {b}?", str(max(a, b)), "compare"
  elif kind == 3:
    shape, sides = choose(rng, (("triangle", 3), ("square", 4), ("diamond", 4)))
    q, ans, sub = f"How many sides does a {shape} have?", str(sides), "sides"
  else:
    w, opp = choose(rng, (("left", "right"), ("right", "left"), ("top", "bottom"),
                          ("bottom", "top"), ("above", "below"), ("below", "above"),
                          ("small", "large"), ("large", "small"), ("yes", "no"),
                          ("no", "yes")))
    q, ans, sub = f"What is the opposite of {w}?", opp, "opposite"
  return {"id": rid, "conversations": [{"from": "human", "value": q},
                                       {"from": "gpt", "value": ans}],
          "type": "text", "subtype": sub, "answer": ans}


_TURN_CUM = list(np.cumsum([w for _, w in TURN_WEIGHTS]) / sum(w for _, w in TURN_WEIGHTS))
# Types whose questions get the short-answer suffix half of the time in instruct.
_BARE_ASKED = ("colour", "count", "position", "exist", "any", "most")


def _caption_record(seed, split, index, image_size):
  rng = sample_rng(seed, split, index)
  scene = draw_scene(rng, image_size)
  request = choose(rng, CAPTION_REQUESTS)
  # Objects in an order drawn per caption: after "a large red" the model must find
  # the large red object to name its shape and cell (what every question type
  # asks), instead of reading cells off in order.
  cap = caption(scene, rng.permutation(len(scene.objects)) if SHUFFLE_CAPTIONS else None)
  rec = {"id": f"{split}_{index}", "image": image_path(split, index),
         "conversations": [{"from": "human", "value": "<image>\n" + request},
                           {"from": "gpt", "value": cap}],
         "type": "caption"}
  return rec, scene


def _instruct_record(seed, split, index, image_size):
  """A text-only sample, or 1 to 4 questions of distinct types about one image
  (the first question's type drawn uniformly; later ones while the questions
  fit TURN_CHAR_BUDGET). One question: "type" is its type; more: "multi"."""
  rng = sample_rng(seed, split, index)
  rid = f"{split}_{index}"
  if rng.random() < TEXT_FRACTION:
    return _text_only(rid, rng), None
  want = TURN_WEIGHTS[pick(_TURN_CUM, rng.random())][0]
  order = [IMAGE_TYPES[int(i)] for i in rng.permutation(len(IMAGE_TYPES))]
  scene, (first,) = scene_for(rng, image_size, order[:1])
  types, asked, texts = [order[0]], [first], []
  for t in order[1:]:
    if len(types) == want:
      break
    q = ASK[t](scene, rng)
    if q is not None:
      types.append(t)
      asked.append(q)
  used, suffixes = 0, []
  for n, (t, q) in enumerate(zip(types, asked)):
    suffix = t in _BARE_ASKED and rng.random() < 0.5
    text = _question_text(q, suffix)
    if n and used + len(text) > TURN_CHAR_BUDGET:
      types, asked = types[:n], asked[:n]
      break
    used += len(text)
    suffixes.append(suffix)
    texts.append(text)
  if len(types) == 1:
    return _single(rid, split, index, types[0], asked[0], suffixes[0]), scene
  conv = []
  for n, (text, q) in enumerate(zip(texts, asked)):
    conv += [{"from": "human", "value": ("<image>\n" if n == 0 else "") + text},
             {"from": "gpt", "value": q["answer"]}]
  rec = {"id": rid, "image": image_path(split, index), "conversations": conv,
         "type": "multi", "types": types, "subtypes": [q["subtype"] for q in asked],
         "answers": [q["answer"] for q in asked]}
  return rec, scene


def _eval_record(seed, split, index, image_size):
  """Type cycles with the index; exist labels and negative kinds, position
  answers and choice letters are balanced by construction."""
  rng = sample_rng(seed, split, index)
  t = IMAGE_TYPES[index % len(IMAGE_TYPES)]
  k = index // len(IMAGE_TYPES)
  kwargs = {"exist": {"label": ("yes", "no")[k % 2], "neg_kind": NEG_KINDS[(k // 2) % 3]},
            "any": {"label": ("yes", "no")[k % 2]},
            "position": {"orient": ("horizontal", "vertical")[k % 2], "want": (k // 2) % 2},
            "choice": {"slot": k}}
  scene, (q,) = scene_for(rng, image_size, (t,), kwargs)
  return _single(f"{split}_{index}", split, index, t, q, suffix=False), scene


BUILDERS = {"caption": _caption_record, "instruct": _instruct_record, "eval": _eval_record}


def _kind_of(split: str, kind: str | None) -> str:
  kind = kind or SPLIT_KINDS.get(split)
  if kind not in BUILDERS:
    raise ValueError(f"split {split!r}: kind must be one of {sorted(BUILDERS)}, got {kind!r}")
  return kind


def sample(seed: int, split: str, index: int, image_size: int = 64,
           kind: str | None = None) -> tuple[dict, Scene | None]:
  """(LLaVA-format record, its Scene or None for text-only) of one sample.

  kind: caption | instruct | eval; by default from the split name
  (captions -> caption, instruct -> instruct, eval -> eval).
  """
  return BUILDERS[_kind_of(split, kind)](seed, split, index, image_size)


def caption_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict:
  """A stage 1 caption record."""
  return _caption_record(seed, split, index, image_size)[0]


def instruct_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict:
  """A stage 2 instruction record (single-turn, multi-turn or text-only)."""
  return _instruct_record(seed, split, index, image_size)[0]


def make_scene(seed: int, split: str, index: int, image_size: int = 64,
               kind: str | None = None) -> Scene | None:
  """The scene of sample `index` of `split` (None for a text-only sample).

  Splits `pope`, `scienceqa`, `vqa` and `gqa` give the scenes of the
  benchmark files' images; other splits as `sample`.
  """
  if kind is None and split in BENCH:
    return BENCH[split](seed, index, image_size)[1]
  return sample(seed, split, index, image_size, kind)[1]


def iter_records(seed: int, split: str, n: int, kind: str | None = None, image_size: int = 64,
                 start: int = 0) -> Iterator[tuple[dict, Image.Image | None]]:
  """Yields (record, rendered PIL image or None) for indices start .. start + n - 1."""
  kind = _kind_of(split, kind)
  for i in range(start, start + n):
    rec, scene = BUILDERS[kind](seed, split, i, image_size)
    yield rec, (render(scene) if scene is not None else None)


def corpus_text(seed: int, n: int) -> list[str]:
  """Text lines for training the tokenizer: n caption and n instruct samples' turns
  (without "<image>"), every template word, and the vicuna_v1 chat scaffolding."""
  lines = [VICUNA_SYSTEM, "USER: ASSISTANT:", SHORT_SUFFIX, CHOICE_SUFFIX]
  lines += list(CAPTION_REQUESTS) + list(ALL_POSITIONS)
  lines.append(" ".join(COLORS + SHAPES + tuple(plural(s) for s in SHAPES) + SIZES + ROWS
                        + COLS + NEG_KINDS + ("yes", "no", "above", "below")))
  lines.append(" ".join([str(i) for i in range(19)] + [f"{c}." for c in LETTERS]))
  for split, build in (("captions", _caption_record), ("instruct", _instruct_record)):
    for i in range(n):
      rec, _ = build(seed, split, i, 64)
      for turn in rec["conversations"]:
        lines.extend(x for x in turn["value"].replace("<image>", "").split("\n") if x)
  return lines


# ---------------------------------------------------------------------------
# Held-out benchmark-format splits.

def pope_image(seed, index, image_size):
  """-> ({neg_kind: [(text, label, combo), ...]}, scene): k positives, k negatives each."""
  rng = sample_rng(seed, "pope", index)
  scene = draw_scene(rng, image_size)
  present = scene.combos()
  k = min(3, len(present))
  pos = sorted(present, key=COMBOS.index)
  pos = [pos[int(i)] for i in rng.permutation(len(pos))[:k]]
  out = {}
  for j, kind in enumerate(NEG_KINDS):
    neg = negatives(present, kind, sample_rng(seed, "pope", index, j + 1), k)
    qs = []
    for p, q in zip(pos, neg):
      qs += [(exist_question(p), "yes", p), (exist_question(q), "no", q)]
    out[kind] = qs
  return out, scene


def sqa_problem(seed, index, image_size):
  rng = sample_rng(seed, "scienceqa", index)
  scene, (q,) = scene_for(rng, image_size, ("choice",))
  return q, scene


_VQA_FORMS = (("colour", "other"), ("short", "other"), ("count", "number"), ("exist", "yes/no"))


def vqa_image(seed, index, image_size):
  """Two questions of different answer forms about one image."""
  rng = sample_rng(seed, "vqa", index)
  i, j = (int(x) for x in rng.permutation(len(_VQA_FORMS))[:2])
  forms = (_VQA_FORMS[i], _VQA_FORMS[j])
  scene, asked = scene_for(rng, image_size, tuple(t for t, _ in forms))
  return [(t, at, q) for (t, at), q in zip(forms, asked)], scene


def gqa_question(seed, index, image_size):
  rng = sample_rng(seed, "gqa", index)
  t = ("colour", "position")[index % 2]
  scene, (q,) = scene_for(rng, image_size, (t,))
  return (t, q), scene


BENCH = {"pope": pope_image, "scienceqa": sqa_problem, "vqa": vqa_image,
         "gqa": gqa_question}
