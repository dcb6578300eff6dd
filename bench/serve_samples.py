"""Requests for the serving benchmarks: (PNG bytes, question) pairs from the built-in
held-out set under a workdir, or PIL-drawn shapes where there is none."""
import io
import json
import os

from PIL import Image, ImageDraw


def drawn_samples(n: int):
  """(PNG bytes, question) of n PIL-drawn shapes."""
  colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 220)}
  out = []
  for i in range(n):
    name, rgb = list(colours.items())[i % 3]
    img = Image.new("RGB", (72, 72), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((10 + i % 5, 12, 50, 52 - i % 4), fill=rgb)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out.append((buf.getvalue(), "What colour is the circle?"))
  return out


def builtin_samples(workdir: str, n: int):
  """(PNG bytes, question) of the first n held-out samples of the built-in set under
  `workdir`/data, or PIL-drawn shapes where there is none."""
  folder = os.path.join(workdir, "data", "mqt_synthetic_benchmarks")
  try:
    with open(os.path.join(folder, "eval.json")) as f:
      records = json.load(f)[:n]
    out = []
    for r in records:
      with open(os.path.join(folder, r["image"]), "rb") as f:
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        out.append((f.read(), question))
    if len(out) == n:
      return out, "built-in held-out set"
  except (OSError, ValueError, KeyError, TypeError):
    pass
  return drawn_samples(n), "PIL-drawn shapes"
