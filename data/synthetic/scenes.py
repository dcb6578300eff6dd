"""Scenes of the synthetic set: objects on a 3x3 grid, drawn from a seeded stream and rendered.

A scene holds 1 to `MAX_OBJECTS` objects, each a shape, a colour, a size and a
grid cell (centred in it), on a lightly textured grey background. Colours and
shapes are drawn with skewed frequencies (`COLOR_WEIGHTS`, `SHAPE_WEIGHTS`), so
some colour-shape combos are popular (`COMBO_RANK`). Geometry is in fractions
of the image side, so one scene renders at any size.
"""
import bisect
import dataclasses
import itertools
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

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

SPLIT_IDS = {"captions": 0, "instruct": 1, "eval": 2, "pope": 3, "scienceqa": 4, "vqa": 5,
             "gqa": 6}


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
# Random draws: every sample has its own stream.

def split_id(split: str) -> int:
  """The stream id of a split (known names fixed, others hashed)."""
  if split in SPLIT_IDS:
    return SPLIT_IDS[split]
  return 1000 + zlib.crc32(split.encode("utf-8")) % (1 << 30)


def sample_rng(seed: int, split: str, index: int, *extra: int) -> np.random.Generator:
  """The stream of sample `index` of `split` (`extra`: sub-streams of that sample)."""
  return np.random.default_rng([int(seed), split_id(split), int(index), *extra])


_COLOR_CUM = list(np.cumsum(COLOR_WEIGHTS) / sum(COLOR_WEIGHTS))
_SHAPE_CUM = list(np.cumsum(SHAPE_WEIGHTS) / sum(SHAPE_WEIGHTS))


def pick(cum, u: float) -> int:
  """The index that a uniform draw `u` selects from cumulative weights `cum`."""
  return min(bisect.bisect_right(cum, u), len(cum) - 1)


def choose(rng: np.random.Generator, seq):
  """One element of `seq`, uniformly."""
  return seq[int(rng.integers(len(seq)))]


def plural(shape: str) -> str:
  return SHAPE_PLURALS.get(shape, shape + "s")


# ---------------------------------------------------------------------------
# Scenes and rendering.

def draw_scene(rng: np.random.Generator, image_size: int) -> Scene:
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
        shape=SHAPES[pick(_SHAPE_CUM, su)], color=COLORS[pick(_COLOR_CUM, cu)], size=size,
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
