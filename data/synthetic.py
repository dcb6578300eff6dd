r"""A built-in synthetic vision-language dataset: coloured shapes on a 3x3 grid.

Each scene is a lightly textured grey background holding 1 to 4 objects. An
object has a shape (circle, square, triangle, diamond, cross), a colour (red,
green, blue, yellow, purple, orange), a size (small, large) and a cell of a
3x3 grid, centred in it (`JITTER` = 0), so objects never overlap and a
vision tower whose patches are the cells (configs/tiny.py: 72 px, 24 px
patches) sees each object whole in one patch. Shapes are drawn flat with a
dark outline (`OUTLINE`), as in a cartoon. Colours and shapes
are drawn with mildly skewed frequencies, so that some colour-shape combos are
"popular" (as objects are in COCO), which POPE's popular negatives need.

Everything is a pure function of (seed, split, index): sample i of a split
uses its own `np.random.default_rng([seed, split_id, i])`, so any sample can
be regenerated alone (data-parallel or TFDS generation) and there is no
global state. Geometry is normalized to [0, 1], so one scene renders at any
`image_size` (64 for the tiny CPU model, 336 for CLIP-L/336).

Splits (each its own stream, so held-out images never appear in training):
  captions   stage 1: "<image>\n" + a caption request -> a caption naming
             every object's size, colour, shape and grid position, objects
             in an order drawn per caption (`SHUFFLE_CAPTIONS`).
  instruct   stage 2: conversations of 1 to 4 single-word-answer questions
             of distinct types about one image (one question: record field
             "type" is its type; more: "multi", with "types"), and a few
             text-only samples ("text", no "image" key).
  eval       held out: `n_eval_per_type` single-turn records per type, with
             the reference "answer" on each record.
  pope, scienceqa, vqa, gqa
             held out, written in the published benchmarks' file formats.

Question types need increasing amounts of visual detail:
  count      "How many (<colour>) objects are there?"       -> "0".."4"
  exist      "Is there a <colour> <shape> in the image?"     -> "yes"/"no"
             (negatives: random / popular / adversarial, field "neg_kind")
  colour     "What color is the <shape>?" (a unique shape)   -> a colour
  short      "What shape is the red object?" etc. + the VQA suffix -> a word
  choice     ScienceQA-style multiple choice (3 or 4 options) -> a letter
  position   "Is the <c> <s> to the left or right of the <c2> <s2>?" (or
             above/below)                                    -> the relation
Two more need the whole image rather than one object, so that a single visual
token summarising the image can answer them:
  any        "Is there anything <colour> in the image?"      -> "yes"/"no"
  most       "Which color is most common in the image?" (a unique most
             frequent colour)                                -> a colour
In `instruct`, colour/count/position/exist questions get the short-answer
suffix half of the time (evaluation code appends it, as LLaVA's does);
`eval` asks them bare. Count answers are numerals.

`generate(out_dir)` writes images/<split>/<index>.png, captions.json,
instruct.json, eval.json, pope/, scienceqa/, vqa/, gqa/ and dataset_info.json
(counts and honest chance rates; see `generate`). `iter_records` yields
(record, PIL image) without writing files; `corpus_text` is the text to train
the tokenizer on. Command line:

  python -m data.synthetic --out_dir=/tmp/synth --image_size=64
"""
import argparse
import bisect
import collections
import dataclasses
import itertools
import json
import os
import struct
import time
import zlib
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

TOKENIZER_VOCAB = 512  # SentencePiece vocabulary size for this data's text.
# Bumped whenever the generator's output changes: a data_dir prepared by another
# version is refused (data.prepare.check_settings) instead of silently reused.
# 2: 1-4 questions per image, centred objects; 3: outlines, caption order; 4: whole-image
# questions (any, most).
DATA_VERSION = 4

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (240, 220, 40), "purple": (145, 50, 195), "orange": (245, 140, 20),
}
COLOR_WEIGHTS = (0.24, 0.20, 0.17, 0.15, 0.13, 0.11)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS = {"cross": "crosses"}
SHAPE_WEIGHTS = (0.28, 0.24, 0.20, 0.16, 0.12)
SIZES = ("small", "large")
RADIUS = {"small": 0.075, "large": 0.14}  # Fraction of the image side.
GRID = 3
# Every shape has a dark outline (width in pixels at 72 px, scaled with the
# image). Without it a shape is its fill colour times a mask: a linear probe on
# a cell's pixels names the shape at 0.76, and the tiny model's tower took
# ~1,500 caption steps to learn shapes; outlined, the probe reads 1.00 and
# reading-order captions name shapes at 0.97 after 900 steps (held-out,
# teacher-forced; 0.28 without the outline).
OUTLINE = 1
OUTLINE_RGB = (25, 25, 25)
SHUFFLE_CAPTIONS = True
JITTER = 0.0  # Max offset of an object from its cell's centre (fraction of the side).
MAX_OBJECTS = 4
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITION_NAMES = (("top left", "top middle", "top right"),
                  ("middle left", "center", "middle right"),
                  ("bottom left", "bottom middle", "bottom right"))
ALL_POSITIONS = tuple(p for row in POSITION_NAMES for p in row)

# Colour-shape combos ranked by their frequency in the training distribution
# (objects are drawn independently, so combo frequency = colour x shape weight).
COMBOS = tuple(itertools.product(COLORS, SHAPES))
COMBO_RANK = tuple(sorted(
    COMBOS, key=lambda cs: (-COLOR_WEIGHTS[COLORS.index(cs[0])]
                            * SHAPE_WEIGHTS[SHAPES.index(cs[1])], COMBOS.index(cs))))
POPULAR_TOP = 3  # A popular negative is one of the 3 most frequent absent combos.

IMAGE_TYPES = ("colour", "count", "position", "exist", "choice", "short", "any", "most")
NEG_KINDS = ("random", "popular", "adversarial")
TEXT_FRACTION = 0.06  # Text-only instruct samples; the rest are about an image.
# Questions per image conversation (as LLaVA's VQAv2 data groups an image's
# questions): a one-word answer is 2 supervised tokens, so one question per
# 80-token sample would spend almost all the compute on the prompt.
TURN_WEIGHTS = ((1, 0.15), (2, 0.2), (3, 0.3), (4, 0.35))
TURN_CHAR_BUDGET = 300  # Characters of question text per conversation (~fits max_len 160).
SHORT_SUFFIX = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
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

SPLIT_IDS = {"captions": 0, "instruct": 1, "eval": 2, "pope": 3, "scienceqa": 4, "vqa": 5,
             "gqa": 6}
SPLIT_KINDS = {"captions": "caption", "instruct": "instruct", "eval": "eval"}
TRAIN_SPLITS = ("captions", "instruct")
HELDOUT_SPLITS = ("eval", "pope", "scienceqa", "vqa", "gqa")
_MAX_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object; x, y (centre) and radius are fractions of the image side."""
  shape: str
  color: str
  size: str
  row: int
  col: int
  x: float
  y: float
  radius: float

  @property
  def position(self) -> str:
    return POSITION_NAMES[self.row][self.col]

  @property
  def combo(self) -> tuple[str, str]:
    return (self.color, self.shape)

  def describe(self) -> str:
    return f"a {self.size} {self.color} {self.shape} in the {self.position}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene: objects in reading order (grid row, then column) on a background."""
  objects: tuple[Obj, ...]
  background: tuple[int, int, int]
  texture_seed: int
  image_size: int = 64

  def combos(self) -> set[tuple[str, str]]:
    return {o.combo for o in self.objects}


# ---------------------------------------------------------------------------
# Scenes and rendering.

def split_id(split: str) -> int:
  """The stream id of a split (known names fixed, others hashed)."""
  if split in SPLIT_IDS:
    return SPLIT_IDS[split]
  return 1000 + zlib.crc32(split.encode("utf-8")) % (1 << 30)


def _rng(seed: int, split: str, index: int, *extra: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), split_id(split), int(index), *extra])


_COLOR_CUM = list(np.cumsum(COLOR_WEIGHTS) / sum(COLOR_WEIGHTS))
_SHAPE_CUM = list(np.cumsum(SHAPE_WEIGHTS) / sum(SHAPE_WEIGHTS))


def _pick(cum, u: float) -> int:
  return min(bisect.bisect_right(cum, u), len(cum) - 1)


def _draw_scene(rng: np.random.Generator, image_size: int) -> Scene:
  """Draws one scene from `rng` (the only source of randomness)."""
  n = 1 + int(rng.integers(MAX_OBJECTS))
  cells = sorted(int(c) for c in rng.permutation(GRID * GRID)[:n])
  u = rng.random((n, 5))
  objects = []
  for (cu, su, zu, ju, jv), cell in zip(u, cells):
    row, col = divmod(cell, GRID)
    size = SIZES[int(zu * 2)]
    r = RADIUS[size]
    jitter = min(JITTER, max(0.0, 0.5 / GRID - r - 0.01))  # Stays inside its cell.
    objects.append(Obj(
        shape=SHAPES[_pick(_SHAPE_CUM, su)], color=COLORS[_pick(_COLOR_CUM, cu)], size=size,
        row=row, col=col, x=float((col + 0.5) / GRID + (2 * ju - 1) * jitter),
        y=float((row + 0.5) / GRID + (2 * jv - 1) * jitter), radius=r))
  grey = 95 + int(rng.integers(70))
  background = tuple(grey + int(t) for t in rng.integers(-12, 13, size=3))  # In [83, 176].
  return Scene(objects=tuple(objects), background=background,
               texture_seed=int(rng.integers(1 << 31)), image_size=int(image_size))


_GRADIENT = np.linspace(-8, 8, 8).round().astype(np.int64)[:, None, None]  # 8x8 texture.


def render(scene: Scene, image_size: int | None = None) -> Image.Image:
  """Renders a scene: textured background (noise + vertical gradient), flat outlined shapes."""
  s = int(image_size or scene.image_size)
  # A smooth texture: 8x8 grey noise plus a vertical gradient, upsampled
  # bilinearly (the same look at any size; cheap to PNG-encode, unlike
  # per-pixel noise).
  k = len(_GRADIENT)
  noise = np.random.default_rng(scene.texture_seed).integers(-10, 11, size=(k, k, 1))
  low = (np.asarray(scene.background) + noise + _GRADIENT).astype(np.uint8)  # In [65, 194].
  img = Image.fromarray(low, "RGB").resize((s, s), Image.BILINEAR)
  draw = ImageDraw.Draw(img)
  line = OUTLINE_RGB if OUTLINE else None
  width = max(1, round(OUTLINE * s / 72)) if OUTLINE else 0
  for o in scene.objects:
    cx, cy, r, fill = o.x * s, o.y * s, o.radius * s, COLOR_RGB[o.color]
    kw = dict(fill=fill, outline=line, width=width)
    if o.shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], **kw)
    elif o.shape == "square":
      h = 0.85 * r
      draw.rectangle([cx - h, cy - h, cx + h, cy + h], **kw)
    elif o.shape == "triangle":
      draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)],
                   **kw)
    elif o.shape == "diamond":
      draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], **kw)
    elif o.shape == "cross":
      w = 0.38 * r
      draw.polygon([(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                    (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
                    (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)], **kw)
    else:
      raise ValueError(f"unknown shape {o.shape!r}")
  return img


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(image: Image.Image, level: int = 1) -> bytes:
  """Encodes an RGB image as PNG (filter "Up" on every row, zlib `level`).

  About twice as fast as PIL's adaptive-filter encoder on these images, and
  smaller; any PNG reader decodes it to the same pixels.
  """
  a = np.asarray(image.convert("RGB"), np.uint8)
  h, w, _ = a.shape
  rows = np.empty((h, 1 + 3 * w), np.uint8)
  rows[:, 0] = 2  # Filter type Up: each byte minus the byte above it (mod 256).
  rows[:, 1:] = a.reshape(h, 3 * w)
  rows[1:, 1:] -= a[:-1].reshape(h - 1, 3 * w)
  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced.
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
          + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _png_chunk(b"IEND", b""))


def caption(scene: Scene, order=None) -> str:
  """The stage 1 caption: every object, in reading order or in `order` (indices)."""
  order = range(len(scene.objects)) if order is None else order
  objs = [scene.objects[int(i)].describe() for i in order]
  if len(objs) == 1:
    return f"There is 1 object: {objs[0]}."
  return f"There are {len(objs)} objects: {', '.join(objs[:-1])} and {objs[-1]}."


# ---------------------------------------------------------------------------
# Questions. Each `_ask_*` returns a dict (question, answer, subtype, extras)
# or None when the scene cannot support that question type.

def _choose(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def _unique(objs, key):
  counts = collections.Counter(key(o) for o in objs)
  return [o for o in objs if counts[key(o)] == 1]


def _plural(shape: str) -> str:
  return SHAPE_PLURALS.get(shape, shape + "s")


def _ask_colour(scene: Scene, rng):
  objs = scene.objects
  named = [(o, o.shape) for o in _unique(objs, lambda o: o.shape)]
  subtype = "shape"
  if not named:
    named = [(o, f"{o.size} {o.shape}") for o in _unique(objs, lambda o: (o.size, o.shape))]
    subtype = "size_shape"
  if not named:
    return None
  o, name = _choose(rng, named)
  return {"question": f"What color is the {name}?", "answer": o.color, "subtype": subtype}


def _ask_count(scene: Scene, rng):
  if rng.random() < 0.5:
    return {"question": "How many objects are there?", "answer": str(len(scene.objects)),
            "subtype": "all"}
  present = {o.color for o in scene.objects}
  if rng.random() < 0.15:
    color = _choose(rng, [c for c in COLORS if c not in present])
  else:  # The colour of a random object: repeated colours are asked more often.
    color = _choose(rng, scene.objects).color
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
  subtype, cands = _choose(rng, options)
  a, b = _choose(rng, cands)
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
    return ranked[:k] if k > 1 else [_choose(rng, ranked[:POPULAR_TOP])]
  if kind == "random":
    pool = [c for c in COMBOS if c not in present]
  elif kind == "adversarial":
    colors, shapes = {c for c, _ in present}, {s for _, s in present}
    pool = [c for c in COMBOS if c not in present and (c[0] in colors or c[1] in shapes)]
  else:
    raise ValueError(f"unknown negative kind {kind!r}; known: {NEG_KINDS}")
  return [pool[int(i)] for i in rng.permutation(len(pool))[:k]]


def _exist_question(combo) -> str:
  article = "an" if combo[0][0] in "aeiou" else "a"
  return f"Is there {article} {combo[0]} {combo[1]} in the image?"


def _ask_exist(scene: Scene, rng, label: str | None = None, neg_kind: str | None = None):
  present = scene.combos()
  label = label or ("yes" if rng.random() < 0.5 else "no")
  if label == "yes":
    combo, neg_kind = _choose(rng, sorted(present, key=COMBOS.index)), None
  else:
    neg_kind = neg_kind or _choose(rng, NEG_KINDS)
    combo = negatives(present, neg_kind, rng)[0]
  return {"question": _exist_question(combo), "answer": label, "subtype": "exist",
          "label": label, "neg_kind": neg_kind, "object": " ".join(combo)}


def _ask_any(scene: Scene, rng, label: str | None = None):
  """Is any object of a colour? Negatives draw uniformly from the absent colours."""
  present = {o.color for o in scene.objects}
  label = label or ("yes" if rng.random() < 0.5 else "no")
  pool = sorted(present, key=COLORS.index) if label == "yes" else \
      [c for c in COLORS if c not in present]
  color = _choose(rng, pool)
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
    o = _choose(rng, shaped)
    parts.append(("color", f"What color is the {o.shape}?", o.color,
                  [c for c in COLORS if c != o.color]))
  present = sorted({o.shape for o in objs}, key=SHAPES.index)
  absent = [s for s in SHAPES if s not in present]
  if len(absent) >= n - 1:
    parts.append(("shape", "Which of these shapes is in the image?", _choose(rng, present),
                  absent))
  named = _unique(objs, lambda o: o.combo)
  if named:
    o = _choose(rng, named)
    parts.append(("position", f"Where is the {o.color} {o.shape}?", o.position,
                  [p for p in ALL_POSITIONS if p != o.position]))
  count = str(len(objs))
  parts.append(("count", "How many objects are in the image?", count,
                [str(i) for i in range(1, MAX_OBJECTS + 1) if str(i) != count]))
  return parts


def _ask_choice(scene: Scene, rng, slot: int | None = None):
  """slot: the correct option goes to letter slot % n (None: a random letter)."""
  n = 3 + int(rng.integers(2))
  subtype, question, correct, pool = _choose(rng, _choice_parts(scene, rng, n))
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
  subtype = _choose(rng, cands)
  if subtype == "shape":
    which = [(o, f"{o.color} object") for o in by_color] + [(o, f"{o.size} object")
                                                            for o in by_size]
    o, name = _choose(rng, which)
    q, a = f"What shape is the {name}?", o.shape
  else:
    o = _choose(rng, named)
    q, a = {"size": (f"What size is the {o.color} {o.shape}?", o.size),
            "row": (f"Which row is the {o.color} {o.shape} in?", ROWS[o.row]),
            "column": (f"Which column is the {o.color} {o.shape} in?", COLS[o.col])}[subtype]
  return {"question": f"{q}\n{SHORT_SUFFIX}", "answer": a, "subtype": subtype, "stem": q}


_ASK = {"colour": _ask_colour, "count": _ask_count, "position": _ask_position,
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


# ---------------------------------------------------------------------------
# Records.

def _image_path(split: str, index: int) -> str:
  return f"images/{split}/{index}.png"


def _scene_for(rng, image_size: int, types, ask_kwargs=None):
  """Draws scenes until every type in `types` can be asked; -> (scene, [asked])."""
  for _ in range(_MAX_TRIES):
    scene = _draw_scene(rng, image_size)
    asked = []
    for t in types:
      q = _ASK[t](scene, rng, **((ask_kwargs or {}).get(t, {})))
      if q is None:
        break
      asked.append(q)
    else:
      return scene, asked
  raise RuntimeError(f"no scene supports {types} in {_MAX_TRIES} draws")


def _question_text(q: dict, suffix: bool) -> str:
  """A question as asked: with the short-answer suffix appended when `suffix`."""
  return q["question"] + (f"\n{SHORT_SUFFIX}" if suffix else "")


def _single(rid: str, split: str, index: int, t: str, q: dict, suffix: bool) -> dict:
  text = _question_text(q, suffix)
  rec = {"id": rid, "image": _image_path(split, index),
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
    shape, sides = _choose(rng, (("triangle", 3), ("square", 4), ("diamond", 4)))
    q, ans, sub = f"How many sides does a {shape} have?", str(sides), "sides"
  else:
    w, opp = _choose(rng, (("left", "right"), ("right", "left"), ("top", "bottom"),
                           ("bottom", "top"), ("above", "below"), ("below", "above"),
                           ("small", "large"), ("large", "small"), ("yes", "no"),
                           ("no", "yes")))
    q, ans, sub = f"What is the opposite of {w}?", opp, "opposite"
  return {"id": rid, "conversations": [{"from": "human", "value": q},
                                       {"from": "gpt", "value": ans}],
          "type": "text", "subtype": sub, "answer": ans}


_TURN_CUM = list(np.cumsum([w for _, w in TURN_WEIGHTS]) / sum(w for _, w in TURN_WEIGHTS))
_BARE_ASKED = ("colour", "count", "position", "exist", "any", "most")  # The suffix is optional for these.


def _caption_record(seed, split, index, image_size):
  rng = _rng(seed, split, index)
  scene = _draw_scene(rng, image_size)
  request = _choose(rng, CAPTION_REQUESTS)
  # Objects in an order drawn per caption: after "a large red" the model must find
  # the large red object to name its shape and cell (what every question type
  # asks), instead of reading cells off in order.
  cap = caption(scene, rng.permutation(len(scene.objects)) if SHUFFLE_CAPTIONS else None)
  rec = {"id": f"{split}_{index}", "image": _image_path(split, index),
         "conversations": [{"from": "human", "value": "<image>\n" + request},
                           {"from": "gpt", "value": cap}],
         "type": "caption"}
  return rec, scene


def _instruct_record(seed, split, index, image_size):
  """A text-only sample, or 1 to 4 questions of distinct types about one image
  (the first question's type drawn uniformly; later ones while the questions
  fit TURN_CHAR_BUDGET). One question: "type" is its type; more: "multi"."""
  rng = _rng(seed, split, index)
  rid = f"{split}_{index}"
  if rng.random() < TEXT_FRACTION:
    return _text_only(rid, rng), None
  want = TURN_WEIGHTS[_pick(_TURN_CUM, rng.random())][0]
  order = [IMAGE_TYPES[int(i)] for i in rng.permutation(len(IMAGE_TYPES))]
  scene, (first,) = _scene_for(rng, image_size, order[:1])
  types, asked, texts = [order[0]], [first], []
  for t in order[1:]:
    if len(types) == want:
      break
    q = _ASK[t](scene, rng)
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
  rec = {"id": rid, "image": _image_path(split, index), "conversations": conv,
         "type": "multi", "types": types, "subtypes": [q["subtype"] for q in asked],
         "answers": [q["answer"] for q in asked]}
  return rec, scene


def _eval_record(seed, split, index, image_size):
  """Type cycles with the index; exist labels and negative kinds, position
  answers and choice letters are balanced by construction."""
  rng = _rng(seed, split, index)
  t = IMAGE_TYPES[index % len(IMAGE_TYPES)]
  k = index // len(IMAGE_TYPES)
  kwargs = {"exist": {"label": ("yes", "no")[k % 2], "neg_kind": NEG_KINDS[(k // 2) % 3]},
            "any": {"label": ("yes", "no")[k % 2]},
            "position": {"orient": ("horizontal", "vertical")[k % 2], "want": (k // 2) % 2},
            "choice": {"slot": k}}
  scene, (q,) = _scene_for(rng, image_size, (t,), kwargs)
  return _single(f"{split}_{index}", split, index, t, q, suffix=False), scene


_BUILDERS = {"caption": _caption_record, "instruct": _instruct_record, "eval": _eval_record}


def _kind_of(split: str, kind: str | None) -> str:
  kind = kind or SPLIT_KINDS.get(split)
  if kind not in _BUILDERS:
    raise ValueError(f"split {split!r}: kind must be one of {sorted(_BUILDERS)}, got {kind!r}")
  return kind


def sample(seed: int, split: str, index: int, image_size: int = 64,
           kind: str | None = None) -> tuple[dict, Scene | None]:
  """(LLaVA-format record, its Scene or None for text-only) of one sample.

  kind: caption | instruct | eval; by default from the split name
  (captions -> caption, instruct -> instruct, eval -> eval).
  """
  return _BUILDERS[_kind_of(split, kind)](seed, split, index, image_size)


def caption_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict:
  """A stage 1 caption record."""
  return _caption_record(seed, split, index, image_size)[0]


def instruct_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict:
  """A stage 2 instruction record (single-turn, multi-turn or text-only)."""
  return _instruct_record(seed, split, index, image_size)[0]


def eval_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict:
  """A held-out single-turn record with "type" and the reference "answer"."""
  return _eval_record(seed, split, index, image_size)[0]


def make_scene(seed: int, split: str, index: int, image_size: int = 64,
               kind: str | None = None) -> Scene | None:
  """The scene of sample `index` of `split` (None for a text-only sample).

  Splits `pope`, `scienceqa`, `vqa` and `gqa` give the scenes of the
  benchmark files' images; other splits as `sample`.
  """
  if kind is None and split in _BENCH:
    return _BENCH[split](seed, index, image_size)[1]
  return sample(seed, split, index, image_size, kind)[1]


def iter_records(seed: int, split: str, n: int, kind: str | None = None, image_size: int = 64,
                 start: int = 0) -> Iterator[tuple[dict, Image.Image | None]]:
  """Yields (record, rendered PIL image or None) for indices start .. start + n - 1."""
  kind = _kind_of(split, kind)
  for i in range(start, start + n):
    rec, scene = _BUILDERS[kind](seed, split, i, image_size)
    yield rec, (render(scene) if scene is not None else None)


def corpus_text(seed: int, n: int) -> list[str]:
  """Text lines for training the tokenizer: n caption and n instruct samples' turns
  (without "<image>"), every template word, and the vicuna_v1 chat scaffolding."""
  lines = [VICUNA_SYSTEM, "USER: ASSISTANT:", SHORT_SUFFIX, CHOICE_SUFFIX]
  lines += list(CAPTION_REQUESTS) + list(ALL_POSITIONS)
  lines.append(" ".join(COLORS + SHAPES + tuple(_plural(s) for s in SHAPES) + SIZES + ROWS
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

def _pope_image(seed, index, image_size):
  """-> ({neg_kind: [(text, label, combo), ...]}, scene): k positives, k negatives each."""
  rng = _rng(seed, "pope", index)
  scene = _draw_scene(rng, image_size)
  present = scene.combos()
  k = min(3, len(present))
  pos = sorted(present, key=COMBOS.index)
  pos = [pos[int(i)] for i in rng.permutation(len(pos))[:k]]
  out = {}
  for j, kind in enumerate(NEG_KINDS):
    neg = negatives(present, kind, _rng(seed, "pope", index, j + 1), k)
    qs = []
    for p, q in zip(pos, neg):
      qs += [(_exist_question(p), "yes", p), (_exist_question(q), "no", q)]
    out[kind] = qs
  return out, scene


def _sqa_problem(seed, index, image_size):
  rng = _rng(seed, "scienceqa", index)
  scene, (q,) = _scene_for(rng, image_size, ("choice",))
  return q, scene


_VQA_FORMS = (("colour", "other"), ("short", "other"), ("count", "number"), ("exist", "yes/no"))


def _vqa_image(seed, index, image_size):
  """Two questions of different answer forms about one image."""
  rng = _rng(seed, "vqa", index)
  i, j = (int(x) for x in rng.permutation(len(_VQA_FORMS))[:2])
  forms = (_VQA_FORMS[i], _VQA_FORMS[j])
  scene, asked = _scene_for(rng, image_size, tuple(t for t, _ in forms))
  return [(t, at, q) for (t, at), q in zip(forms, asked)], scene


def _gqa_question(seed, index, image_size):
  rng = _rng(seed, "gqa", index)
  t = ("colour", "position")[index % 2]
  scene, (q,) = _scene_for(rng, image_size, (t,))
  return (t, q), scene


_BENCH = {"pope": _pope_image, "scienceqa": _sqa_problem, "vqa": _vqa_image,
          "gqa": _gqa_question}


def _gqa_full_answer(q: dict) -> str:
  stem = q["question"].rstrip("?")
  if q["subtype"] in ("horizontal", "vertical"):
    a, b = stem[len("Is the "):].split(" to the left or right of " if q["subtype"] == "horizontal"
                                       else " above or below ")
    rel = {"left": "to the left of", "right": "to the right of", "above": "above",
           "below": "below"}[q["answer"]]
    return f"The {a} is {rel} {b}."
  return f"The {stem[len('What color is the '):]} is {q['answer']}."


# ---------------------------------------------------------------------------
# Writing everything.

class _Writer:
  """Renders and saves images, counting them per split."""

  def __init__(self, out_dir: str, image_size: int):
    self.out_dir, self.image_size = out_dir, image_size
    self.count = collections.Counter()

  def save(self, split: str, index: int, scene: Scene):
    with open(os.path.join(self.out_dir, _image_path(split, index)), "wb") as f:
      f.write(png_bytes(render(scene, self.image_size)))
    self.count[split] += 1


def _dump(path: str, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=None, separators=(",", ":"))


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
  1 / #possible answers.
  """
  t0 = time.perf_counter()
  for split in TRAIN_SPLITS + HELDOUT_SPLITS:
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
  w = _Writer(out_dir, image_size)
  timing = {}

  def run_split(split, kind, n):
    t = time.perf_counter()
    recs = []
    for i in range(n):
      rec, scene = _BUILDERS[kind](seed, split, i, image_size)
      if scene is not None:
        w.save(split, i, scene)
      recs.append(rec)
    timing[split] = time.perf_counter() - t
    return recs

  captions = run_split("captions", "caption", n_caption)
  instruct = run_split("instruct", "instruct", n_instruct)
  evals = run_split("eval", "eval", n_eval_per_type * len(IMAGE_TYPES))
  _dump(os.path.join(out_dir, "captions.json"), captions)
  _dump(os.path.join(out_dir, "instruct.json"), instruct)
  _dump(os.path.join(out_dir, "eval.json"), evals)

  # POPE: the same images and positives in all three files, negatives per kind.
  t = time.perf_counter()
  pope = {k: [] for k in NEG_KINDS}
  index = 0
  while len(pope["random"]) < n_eval_per_type:
    qs, scene = _pope_image(seed, index, image_size)
    w.save("pope", index, scene)
    for kind in NEG_KINDS:
      for text, label, combo in qs[kind]:
        pope[kind].append({"question_id": len(pope[kind]), "image": _image_path("pope", index),
                           "text": text, "label": label, "category": kind,
                           "object": " ".join(combo)})
    index += 1
  for kind in NEG_KINDS:
    path = os.path.join(out_dir, "pope", f"synthetic_pope_{kind}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.writelines(json.dumps(q) + "\n" for q in pope[kind])
  timing["pope"] = time.perf_counter() - t

  # ScienceQA: the release's problems.json / pid_splits.json, and LLaVA's question file.
  t = time.perf_counter()
  problems, llava_sqa = {}, []
  for i in range(n_eval_per_type):
    q, scene = _sqa_problem(seed, i, image_size)
    w.save("scienceqa", i, scene)
    pid, img = str(i), _image_path("scienceqa", i)
    problems[pid] = {"question": q["stem"], "choices": q["choices"], "answer": q["answer_index"],
                     "hint": "", "image": img, "task": "closed choice", "grade": "grade1",
                     "subject": "natural science", "topic": "shapes", "category": q["subtype"],
                     "skill": q["subtype"], "lecture": "", "solution": "", "split": "test"}
    llava_sqa.append({"id": pid, "image": img, "conversations": [
        {"from": "human", "value": "<image>\n" + q["question"]},
        {"from": "gpt", "value": q["answer"]}]})
  _dump(os.path.join(out_dir, "scienceqa", "problems.json"), problems)
  _dump(os.path.join(out_dir, "scienceqa", "pid_splits.json"), {"test": list(problems)})
  _dump(os.path.join(out_dir, "scienceqa", "llava_test.json"), llava_sqa)
  timing["scienceqa"] = time.perf_counter() - t

  # VQAv2 style: two questions per image, ten (agreeing) human answers each.
  t = time.perf_counter()
  questions, annotations = [], []
  for i in range((n_eval_per_type + 1) // 2):
    qs, scene = _vqa_image(seed, i, image_size)
    w.save("vqa", i, scene)
    for j, (qtype, answer_type, q) in enumerate(qs):
      qid = i * 10 + j
      questions.append({"image_id": i, "question": q["question"].split("\n")[0],
                        "question_id": qid, "image": _image_path("vqa", i)})
      annotations.append({
          "question_id": qid, "image_id": i, "answer_type": answer_type,
          "question_type": qtype, "multiple_choice_answer": q["answer"],
          "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": k + 1}
                      for k in range(10)]})
  _dump(os.path.join(out_dir, "vqa", "questions.json"),
        {"info": {"description": "mqt synthetic"}, "task_type": "Open-Ended",
         "data_type": "synthetic", "data_subtype": "test", "questions": questions})
  _dump(os.path.join(out_dir, "vqa", "annotations.json"),
        {"info": {"description": "mqt synthetic"}, "data_type": "synthetic",
         "data_subtype": "test", "annotations": annotations})
  timing["vqa"] = time.perf_counter() - t

  # GQA style: colour and position questions.
  t = time.perf_counter()
  gqa = {}
  for i in range(n_eval_per_type):
    (qtype, q), scene = _gqa_question(seed, i, image_size)
    w.save("gqa", i, scene)
    gqa[str(i)] = {"imageId": str(i), "image": _image_path("gqa", i), "question": q["question"],
                   "answer": q["answer"], "fullAnswer": _gqa_full_answer(q),
                   "isBalanced": True,
                   "types": {"structural": "choose" if qtype == "position" else "query",
                             "semantic": "rel" if qtype == "position" else "attr",
                             "detailed": qtype}}
  _dump(os.path.join(out_dir, "gqa", "testdev_balanced_questions.json"), gqa)
  timing["gqa"] = time.perf_counter() - t

  rates = chance_rates(evals)
  yes_rate = sum(q["label"] == "yes" for q in pope["random"]) / max(1, len(pope["random"]))
  info = {
      "name": "mqt_synthetic", "seed": seed, "image_size": image_size, "grid": GRID,
      "max_objects": MAX_OBJECTS, "colors": list(COLORS), "shapes": list(SHAPES),
      "sizes": list(SIZES), "color_weights": list(COLOR_WEIGHTS),
      "shape_weights": list(SHAPE_WEIGHTS),
      "popular_combos": [" ".join(c) for c in COMBO_RANK[:10]],
      "types": list(IMAGE_TYPES),
      "counts": {
          "captions": len(captions), "instruct": len(instruct), "eval": len(evals),
          "instruct_by_type": dict(sorted(collections.Counter(r["type"] for r in instruct)
                                          .items())),
          "eval_by_type": dict(sorted(collections.Counter(r["type"] for r in evals).items())),
          "pope": {k: len(v) for k, v in pope.items()}, "scienceqa": len(problems),
          "vqa": len(questions), "gqa": len(gqa), "images": dict(sorted(w.count.items())),
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
  _dump(os.path.join(out_dir, "dataset_info.json"), info)
  timing["total"] = time.perf_counter() - t0
  info["_timing"] = timing
  return info


def _majority(pairs) -> float:
  """Majority-answer rate within groups: pairs of (group, answer)."""
  groups = collections.defaultdict(collections.Counter)
  for g, a in pairs:
    groups[g][a] += 1
  return sum(max(c.values()) for c in groups.values()) / max(1, len(pairs))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
  main()
