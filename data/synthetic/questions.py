"""Questions about a scene, their answers, and the chance rates of image-blind guessers.

Each `_ask_<type>(scene, rng, ...)` returns a dict (question, answer, subtype,
extras) or None when the scene cannot support that question type; `ASK` maps
each type of `IMAGE_TYPES` to its asker, and `scene_for` draws scenes until
every wanted type can be asked.
"""
import collections

import numpy as np

from data.synthetic.scenes import (ALL_POSITIONS, COLORS, COMBO_RANK, COMBOS, COLS, GRID,
                                   MAX_OBJECTS, ROWS, SHAPES, SIZES, Scene, choose, draw_scene)

POPULAR_TOP = 3  # A popular negative is one of the 3 most frequent absent combos.

IMAGE_TYPES = ("colour", "count", "position", "exist", "choice", "short", "any", "most")
NEG_KINDS = ("random", "popular", "adversarial")
SHORT_SUFFIX = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
_MAX_TRIES = 1000  # Scenes drawn at most for one set of question types.


def _unique(objs, key):
  counts = collections.Counter(key(o) for o in objs)
  return [o for o in objs if counts[key(o)] == 1]


def _ask_colour(scene: Scene, rng):
  objs = scene.objects
  named = [(o, o.shape) for o in _unique(objs, lambda o: o.shape)]
  subtype = "shape"
  if not named:
    named = [(o, f"{o.size} {o.shape}") for o in _unique(objs, lambda o: (o.size, o.shape))]
    subtype = "size_shape"
  if not named:
    return None
  o, name = choose(rng, named)
  return {"question": f"What color is the {name}?", "answer": o.color, "subtype": subtype}


def _ask_count(scene: Scene, rng):
  if rng.random() < 0.5:
    return {"question": "How many objects are there?", "answer": str(len(scene.objects)),
            "subtype": "all"}
  present = {o.color for o in scene.objects}
  if rng.random() < 0.15:
    color = choose(rng, [c for c in COLORS if c not in present])
  else:  # The colour of a random object: repeated colours are asked more often.
    color = choose(rng, scene.objects).color
  n = sum(o.color == color for o in scene.objects)
  return {"question": f"How many {color} objects are there?", "answer": str(n),
          "subtype": "color"}


def _ask_position(scene: Scene, rng, orient: str | None = None, want: int | None = None):
  """orient: horizontal | vertical | None (either); want: 0 for left/above, 1 for
  right/below (swapping the pair), None for either."""
  objs = _unique(scene.objects, lambda o: o.combo)
  pairs = [(a, b) for a in objs for b in objs if a is not b]
  options = [(k, p) for k, p in (("horizontal", [(a, b) for a, b in pairs if a.col != b.col]),
                                 ("vertical", [(a, b) for a, b in pairs if a.row != b.row])) if p]
  options = [(k, p) for k, p in options if orient in (None, k)]
  if not options:
    return None
  subtype, cands = choose(rng, options)
  a, b = choose(rng, cands)
  if want is not None and (a.x > b.x if subtype == "horizontal" else a.y > b.y) != bool(want):
    a, b = b, a
  if subtype == "horizontal":
    rel, answer = "to the left or right of", "left" if a.x < b.x else "right"
  else:
    rel, answer = "above or below", "above" if a.y < b.y else "below"
  return {"question": f"Is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?",
          "answer": answer, "subtype": subtype}


def negatives(present: set, kind: str, rng: np.random.Generator, k: int = 1) -> list:
  """k absent colour-shape combos, POPE-style.

  random: uniform over absent combos. popular: the most frequent absent combos
  in the training distribution (k == 1: one of the top `POPULAR_TOP`).
  adversarial: absent combos sharing a colour or a shape with a present object.
  """
  if kind == "popular":
    ranked = [c for c in COMBO_RANK if c not in present]
    return ranked[:k] if k > 1 else [choose(rng, ranked[:POPULAR_TOP])]
  if kind == "random":
    pool = [c for c in COMBOS if c not in present]
  elif kind == "adversarial":
    colors, shapes = {c for c, _ in present}, {s for _, s in present}
    pool = [c for c in COMBOS if c not in present and (c[0] in colors or c[1] in shapes)]
  else:
    raise ValueError(f"unknown negative kind {kind!r}; known: {NEG_KINDS}")
  return [pool[int(i)] for i in rng.permutation(len(pool))[:k]]


def exist_question(combo) -> str:
  article = "an" if combo[0][0] in "aeiou" else "a"
  return f"Is there {article} {combo[0]} {combo[1]} in the image?"


def _ask_exist(scene: Scene, rng, label: str | None = None, neg_kind: str | None = None):
  present = scene.combos()
  label = label or ("yes" if rng.random() < 0.5 else "no")
  if label == "yes":
    combo, neg_kind = choose(rng, sorted(present, key=COMBOS.index)), None
  else:
    neg_kind = neg_kind or choose(rng, NEG_KINDS)
    combo = negatives(present, neg_kind, rng)[0]
  return {"question": exist_question(combo), "answer": label, "subtype": "exist",
          "label": label, "neg_kind": neg_kind, "object": " ".join(combo)}


def _ask_any(scene: Scene, rng, label: str | None = None):
  """Is any object of a colour? Negatives draw uniformly from the absent colours."""
  present = {o.color for o in scene.objects}
  label = label or ("yes" if rng.random() < 0.5 else "no")
  pool = sorted(present, key=COLORS.index) if label == "yes" else \
      [c for c in COLORS if c not in present]
  color = choose(rng, pool)
  return {"question": f"Is there anything {color} in the image?", "answer": label,
          "subtype": "color", "label": label}


def _ask_most(scene: Scene, rng):
  """The most frequent colour; None when two colours tie for it."""
  counts = collections.Counter(o.color for o in scene.objects).most_common()
  if len(counts) > 1 and counts[0][1] == counts[1][1]:
    return None
  return {"question": "Which color is most common in the image?", "answer": counts[0][0],
          "subtype": "color"}


def _choice_parts(scene: Scene, rng, n: int):
  """-> (subtype, question, correct option, distractor pool) candidates."""
  objs = scene.objects
  parts = []
  shaped = _unique(objs, lambda o: o.shape)
  if shaped:
    o = choose(rng, shaped)
    parts.append(("color", f"What color is the {o.shape}?", o.color,
                  [c for c in COLORS if c != o.color]))
  present = sorted({o.shape for o in objs}, key=SHAPES.index)
  absent = [s for s in SHAPES if s not in present]
  if len(absent) >= n - 1:
    parts.append(("shape", "Which of these shapes is in the image?", choose(rng, present),
                  absent))
  named = _unique(objs, lambda o: o.combo)
  if named:
    o = choose(rng, named)
    parts.append(("position", f"Where is the {o.color} {o.shape}?", o.position,
                  [p for p in ALL_POSITIONS if p != o.position]))
  count = str(len(objs))
  parts.append(("count", "How many objects are in the image?", count,
                [str(i) for i in range(1, MAX_OBJECTS + 1) if str(i) != count]))
  return parts


def _ask_choice(scene: Scene, rng, slot: int | None = None):
  """slot: the correct option goes to letter slot % n (None: a random letter)."""
  n = 3 + int(rng.integers(2))
  subtype, question, correct, pool = choose(rng, _choice_parts(scene, rng, n))
  options = [pool[int(i)] for i in rng.permutation(len(pool))[:n - 1]]
  k = int(rng.integers(n)) if slot is None else slot % n
  options.insert(k, correct)
  text = "\n".join([question] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
                   + [CHOICE_SUFFIX])
  return {"question": text, "answer": LETTERS[k], "subtype": subtype, "choices": options,
          "answer_index": k, "n_options": n, "stem": question}


def _ask_short(scene: Scene, rng):
  objs = scene.objects
  cands = []
  by_color = _unique(objs, lambda o: o.color)
  by_size = _unique(objs, lambda o: o.size) if len(objs) > 1 else []
  if by_color or by_size:
    cands.append("shape")
  named = _unique(objs, lambda o: o.combo)
  if named:
    cands += ["size", "row", "column"]
  if not cands:
    return None
  subtype = choose(rng, cands)
  if subtype == "shape":
    which = [(o, f"{o.color} object") for o in by_color] + [(o, f"{o.size} object")
                                                            for o in by_size]
    o, name = choose(rng, which)
    q, a = f"What shape is the {name}?", o.shape
  else:
    o = choose(rng, named)
    q, a = {"size": (f"What size is the {o.color} {o.shape}?", o.size),
            "row": (f"Which row is the {o.color} {o.shape} in?", ROWS[o.row]),
            "column": (f"Which column is the {o.color} {o.shape} in?", COLS[o.col])}[subtype]
  return {"question": f"{q}\n{SHORT_SUFFIX}", "answer": a, "subtype": subtype, "stem": q}


ASK = {"colour": _ask_colour, "count": _ask_count, "position": _ask_position,
       "exist": _ask_exist, "choice": _ask_choice, "short": _ask_short, "any": _ask_any,
       "most": _ask_most}


def n_answers(rec: dict) -> int:
  """How many answers the record's question form allows (uniform-guess chance = 1/n)."""
  t, sub = rec["type"], rec.get("subtype")
  if t in ("colour", "most"):
    return len(COLORS)
  if t == "count":
    return MAX_OBJECTS if sub == "all" else MAX_OBJECTS + 1
  if t in ("position", "exist", "any"):
    return 2
  if t == "choice":
    return rec["n_options"]
  if t == "short":
    return {"shape": len(SHAPES), "size": len(SIZES), "row": GRID, "column": GRID}[sub]
  raise ValueError(f"no answer set for type {t!r}")


def prior_key(rec: dict) -> tuple:
  """What an image-blind guesser may condition on: the question's form."""
  if rec["type"] == "choice":
    return ("choice", rec["n_options"])
  return (rec["type"], rec.get("subtype"))


def chance_rates(records: list) -> dict:
  """Per type: majority-answer rate given the question form, and the uniform-guess rate."""
  by_type = collections.defaultdict(list)
  for r in records:
    by_type[r["type"]].append(r)
  majority, uniform = {}, {}
  for t, recs in sorted(by_type.items()):
    groups = collections.defaultdict(collections.Counter)
    for r in recs:
      groups[prior_key(r)][r["answer"]] += 1
    majority[t] = sum(max(c.values()) for c in groups.values()) / len(recs)
    uniform[t] = sum(1.0 / n_answers(r) for r in recs) / len(recs)
  return {"majority": majority, "uniform": uniform}


def scene_for(rng, image_size: int, types, ask_kwargs=None):
  """Draws scenes until every type in `types` can be asked; -> (scene, [asked])."""
  for _ in range(_MAX_TRIES):
    scene = draw_scene(rng, image_size)
    asked = []
    for t in types:
      q = ASK[t](scene, rng, **((ask_kwargs or {}).get(t, {})))
      if q is None:
        break
      asked.append(q)
    else:
      return scene, asked
  raise RuntimeError(f"no scene supports {types} in {_MAX_TRIES} draws")
