"""A small real dataset as a user would bring it, broken records included.

`write(root, seed=0)` writes, under `root`:

  images/            ~125 images from packages, not from data/synthetic/:
                     scikit-image photos (`skimage.data`: astronaut, chelsea, coffee,
                     rocket, camera, horse, coins, moon, clock, colorwheel, logo),
                     each resized, cropped, flipped and colour-tinted into 8 variants
                     (JPEG; PNG for the binary horse and the RGBA logo), and
                     scikit-learn's 8x8 `load_digits` upscaled to 48 px (PNG), plus
                     the broken files (zero bytes, a half JPEG, a PNG header with
                     garbage after it, a text file named .jpg).
  images/heldout/    images that no training record uses.
  captions.json      stage 1: LLaVA records, one caption round each
                     ("a photo of a cat", "the digit 3"), all valid.
  train.json         stage 2: questions whose answers need the image (which digit,
                     photo or digit, main colour, flipped, what is shown; some with
                     the benchmarks' answer suffixes), multi-round and text-only
                     records, and one or more broken records of every kind.
  train_malformed.json  train.json with one comma removed (a JSON syntax error).
  heldout.json       the end-of-run evaluation: LLaVA records with "type" and
                     "answer" fields, on held-out images.
  pope/              coco_pope_{random,popular,adversarial}.json (JSON lines).
  scienceqa/         problems.json + pid_splits.json (images: folder/<image>).
  vqav2/             questions.json + annotations.json (VQA format; half the
                     images named COCO_val2014_<image_id:012d>.jpg in images/vqa).

Returns a dict of those paths and of what a reader must find:
  expected_skipped  {reason: count} over train.json (reasons as in data/records.py)
  broken            [{"index", "id", "reason"}] in file order
  first_broken      the first of those
  n_records         records in train.json; n_good: the valid ones
  n_rounds          samples of train.json split one per question-answer round
                    (broken records count one each: none of them pairs up twice);
                    n_good_rounds: those of the valid records
  eval_types        {type: count} of heldout.json
  malformed         {"path", "line", "column"} of the syntax error
"""
import json
import os

import numpy as np
from PIL import Image

# Reason keys of data/records.py.
REASONS = ("missing_image", "empty_image", "corrupt_image", "image_token_without_image",
           "image_without_image_token", "several_image_tokens", "not_alternating",
           "empty_conversations", "no_conversations", "bad_turn", "duplicate_id", "overlong")
# Reasons a dataset preparation can judge without a tokenizer and sequence length.
PREPARE_REASONS = tuple(r for r in REASONS if r != "overlong")

PHOTOS = (  # skimage.data name, what it shows, file format.
    ("astronaut", "an astronaut", "JPEG"), ("chelsea", "a cat", "JPEG"),
    ("coffee", "a cup of coffee", "JPEG"), ("rocket", "a rocket", "JPEG"),
    ("camera", "a man with a camera", "JPEG"), ("horse", "a horse", "PNG"),
    ("coins", "some coins", "JPEG"), ("moon", "the moon", "JPEG"),
    ("clock", "a clock", "JPEG"), ("colorwheel", "a colour wheel", "JPEG"),
    ("logo", "a logo", "PNG"))
TINTS = {"red": (1.0, 0.35, 0.35), "green": (0.35, 1.0, 0.35), "blue": (0.35, 0.35, 1.0)}
# Variant: (crop, flip, tint); variants 6 and 7 are held out.
VARIANTS = ((False, False, None), (False, True, None), (False, False, "red"),
            (False, False, "green"), (True, False, "blue"), (True, True, None),
            (True, False, "red"), (True, True, "green"))
HELDOUT_VARIANTS = (6, 7)
DIGITS_TRAIN, DIGITS_HELDOUT = 24, 14
SHORT = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."
LETTERS = "ABCD"


def _photo(name: str) -> np.ndarray:
  """skimage.data.<name>() as uint8 [H, W] or [H, W, C] (bool images -> 0 / 255)."""
  from skimage import data  # pylint: disable=import-outside-toplevel
  x = getattr(data, name)()
  if x.dtype == bool:
    x = x.astype(np.uint8) * 255
  return x


def _variant(img: Image.Image, crop: bool, flip: bool, tint: str | None,
             rng: np.random.Generator) -> Image.Image:
  """One variant of a photo, long side 96 px: cropped to 70-85 %, mirrored, tinted."""
  if crop:
    w, h = img.size
    f = rng.uniform(0.7, 0.85)
    cw, ch = int(w * f), int(h * f)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
  if flip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  scale = 96 / max(img.size)
  img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                   Image.Resampling.BILINEAR)
  if tint:
    rgb = np.asarray(img.convert("RGB"), np.float32)
    rgb = rgb * np.array(TINTS[tint], np.float32) + 60 * np.array(TINTS[tint]) ** 4
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
  return img


def _save(img: Image.Image, path: str, fmt: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if fmt == "JPEG" and img.mode not in ("RGB", "L"):
    img = img.convert("RGB")
  img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _images(folder: str, seed: int) -> list[dict]:
  """Writes the photo variants and digits; -> one dict per image: rel (path under
  `folder`), kind ("photo" | "digit"), label, flipped, tint, digit, heldout."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = []
  for name, label, fmt in PHOTOS:
    base = Image.fromarray(_photo(name))
    if name == "horse":
      base = base.convert("1")  # A bilevel PNG, as scanned drawings come.
    for v, (crop, flip, tint) in enumerate(VARIANTS):
      img = _variant(base if base.mode != "1" else base.convert("L"), crop, flip, tint, rng)
      if name == "horse" and not tint:
        img = img.convert("1")
      ext = "jpg" if fmt == "JPEG" else "png"
      heldout = v in HELDOUT_VARIANTS
      rel = os.path.join("heldout" if heldout else "photos", f"{name}_{v}.{ext}")
      _save(img, os.path.join(folder, rel), fmt)
      out.append(dict(rel=rel, kind="photo", label=label, flipped=flip, tint=tint,
                      digit=None, heldout=heldout))
  digits = load_digits()
  picks = rng.permutation(len(digits.images))[:DIGITS_TRAIN + DIGITS_HELDOUT]
  for k, i in enumerate(picks):
    pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
    img = Image.fromarray(255 - pixels).resize((48, 48), Image.Resampling.NEAREST)
    heldout = k >= DIGITS_TRAIN
    rel = os.path.join("heldout" if heldout else "digits", f"digit_{k:02d}.png")
    _save(img.convert("RGB") if k % 2 else img, os.path.join(folder, rel), "PNG")
    out.append(dict(rel=rel, kind="digit", label=f"the digit {digits.target[i]}",
                    flipped=False, tint=None, digit=int(digits.target[i]), heldout=heldout))
  return out


def _conv(*pairs, image: bool = True) -> list[dict]:
  """(question, answer) pairs -> LLaVA turns; the first question gets "<image>\\n"."""
  turns = []
  for k, (q, a) in enumerate(pairs):
    turns += [{"from": "human", "value": ("<image>\n" if image and k == 0 else "") + q},
              {"from": "gpt", "value": a}]
  return turns


def _questions(im: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
  """Questions about one image whose answers need the image."""
  kind = "a digit" if im["kind"] == "digit" else "a photo"
  qs = [("Is this a photo or a digit?", kind),
        ("Is there a digit in the image?" + SHORT, "Yes" if im["kind"] == "digit" else "No")]
  if im["kind"] == "digit":
    d = im["digit"]
    other = int((d + 1 + rng.integers(0, 9)) % 10)
    options = [str(d), str(other)] if rng.random() < 0.5 else [str(other), str(d)]
    mc = ("Which digit is shown?\n" + "\n".join(f"{LETTERS[j]}. {o}"
                                                for j, o in enumerate(options)) + CHOICE)
    qs += [("Which digit is this?", str(d)), ("What number is written here?" + SHORT, str(d)),
           (mc, LETTERS[options.index(str(d))])]
  else:
    qs += [("What is in the picture?", im["label"]),
           ("Is the image flipped?", "yes" if im["flipped"] else "no")]
    if im["tint"]:
      qs.append(("What is the main colour of this image?" + SHORT, im["tint"]))
  return qs


def _caption(im: dict) -> str:
  if im["kind"] == "digit":
    return im["label"]
  words = f"a photo of {im['label']}"
  if im["tint"]:
    words += f", tinted {im['tint']}"
  return words + (", mirrored" if im["flipped"] else "")


TEXT_ONLY = (("What is two plus three?", "five"), ("Name a primary colour.", "red"),
             ("How many legs does a horse have?", "four"),
             ("What comes after the digit 7?", "8"), ("Is the moon a planet?", "no"),
             ("Spell the word cat.", "c a t"))


def _broken_files(folder: str, jpeg: str, png: str) -> dict:
  """The unreadable files; -> {name: reason}. garbage.png keeps a real PNG's header
  (it opens, its size is known) with its pixel data overwritten: decoding fails."""
  with open(jpeg, "rb") as f:
    data = f.read()
  with open(png, "rb") as f:
    head = f.read()[:41]  # Signature, IHDR and the start of the next chunk.
  files = {"broken/empty.jpg": (b"", "empty_image"),
           "broken/half.jpg": (data[:len(data) // 2], "corrupt_image"),
           "broken/garbage.png": (head + bytes(range(256)) * 4, "corrupt_image"),
           "broken/notes.jpg": (b"these are my notes, not a picture\n", "corrupt_image")}
  for rel, (payload, _) in files.items():
    os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
    with open(os.path.join(folder, rel), "wb") as f:
      f.write(payload)
  return {rel: reason for rel, (_, reason) in files.items()}


def _broken_records(files: dict, good_image: str, dup_of: dict) -> list[tuple[str, dict]]:
  """(reason, record) of every broken kind; ids "bad-<n>". Each has exactly one
  problem and at most one question-answer round."""
  ok = _conv(("What is in the picture?", "a cat"))
  out = [("missing_image", {"image": "photos/no_such_file.jpg", "conversations": ok})]
  out += [(reason, {"image": rel, "conversations": ok}) for rel, reason in files.items()]
  out += [
      ("image_token_without_image", {"conversations": _conv(("What is this?", "a cat"))}),
      ("image_without_image_token",
       {"image": good_image, "conversations": _conv(("What is this?", "a cat"), image=False)}),
      ("several_image_tokens",
       {"image": good_image, "conversations": _conv(("<image>\nWhat is this?", "a cat"))}),
      ("not_alternating", {"image": good_image, "conversations": [
          {"from": "human", "value": "<image>\nWhat is this?"},
          {"from": "human", "value": "Is it a cat?"}]}),
      ("empty_conversations", {"image": good_image, "conversations": []}),
      ("no_conversations", {"image": good_image}),
      ("bad_turn", {"image": good_image, "conversations": [
          {"from": "human", "value": "<image>\nHow many cats are there?"},
          {"from": "gpt", "value": 1}]}),
      ("overlong", {"image": good_image, "conversations": _conv(
          ("Describe the picture in detail.",
           " ".join(["a small grey cat sits on a chair and looks at the camera"] * 40)))}),
  ]
  records = [(reason, {"id": f"bad-{n}", **rec}) for n, (reason, rec) in enumerate(out)]
  records.append(("duplicate_id", dict(dup_of)))  # A copy of a valid record, same id.
  return records


def _malformed(text: str, path: str) -> dict:
  """Writes `text` with the comma after its 40th "id" line removed; -> where the JSON
  parser reports the error (line, column: 1-based, as Python's json module does)."""
  lines = text.split("\n")
  hits = [n for n, line in enumerate(lines) if line.strip().startswith('"id"')]
  n = hits[min(40, len(hits) - 1)]
  assert lines[n].endswith(","), lines[n]
  lines[n] = lines[n][:-1]
  bad = "\n".join(lines)
  with open(path, "w", encoding="utf-8") as f:
    f.write(bad)
  try:
    json.loads(bad)
  except json.JSONDecodeError as e:
    return {"path": path, "line": e.lineno, "column": e.colno}
  raise AssertionError("the malformed copy parsed")


def _dump(obj, path: str, lines: bool = False) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    if lines:
      f.write("".join(json.dumps(r) + "\n" for r in obj))
    else:
      json.dump(obj, f, indent=1)
  return path


def _benchmarks(root: str, folder: str, held: list[dict], rng) -> dict:
  """POPE, ScienceQA and VQAv2 files in their published formats, on held-out images."""
  photos = [im for im in held if im["kind"] == "photo"]
  digits = [im for im in held if im["kind"] == "digit"]
  # POPE: "Is there a <object> in the image?" yes/no, three files (JSON lines).
  pope = os.path.join(root, "pope")
  for s, split in enumerate(("random", "popular", "adversarial")):
    recs = []
    for k, im in enumerate(photos[s::3][:3] + digits[s::3][:3]):
      asks_digit = (k + s) % 2 == 0
      label = "yes" if (im["kind"] == "digit") == asks_digit else "no"
      recs.append({"question_id": 100 * s + k, "image": im["rel"],
                   "text": f"Is there a {'digit' if asks_digit else 'photo'} in the image?",
                   "label": label, "category": split})
    _dump(recs, os.path.join(pope, f"coco_pope_{split}.json"), lines=True)
  # ScienceQA: multiple choice; one problem without an image (not in the IMG subset).
  problems, test = {}, []
  for k, im in enumerate(digits[:4] + photos[:3]):
    pid = str(1000 + k)
    if im["kind"] == "digit":
      choices = [str(im["digit"]), str((im["digit"] + 3) % 10)]
      question = "Which digit is shown?"
    else:
      choices = ["a photo", "a digit"]
      question = "What kind of image is this?"
    order = rng.permutation(2)
    problems[pid] = {"question": question, "choices": [choices[j] for j in order],
                     "answer": int(np.argmin(order)), "hint": "" if k % 2 else "Look closely.",
                     "image": im["rel"], "split": "test", "subject": "natural science",
                     "grade": "grade3", "category": "digits" if im["kind"] == "digit" else "kinds"}
    test.append(pid)
  problems["1999"] = {"question": "Which is a colour?", "choices": ["red", "seven"],
                      "answer": 0, "hint": "", "image": None, "split": "test",
                      "subject": "language science"}
  test.append("1999")
  sqa = os.path.join(root, "scienceqa")
  out = {"scienceqa_problems": _dump(problems, os.path.join(sqa, "problems.json")),
         "scienceqa_pid_splits": _dump({"train": [], "val": [], "test": test},
                                       os.path.join(sqa, "pid_splits.json")),
         "scienceqa_image_folder": folder, "pope_folder": pope, "pope_image_folder": folder}
  # VQAv2: images copied into images/vqa, half with COCO names (found by image_id).
  vqa_images = os.path.join(folder, "vqa")
  os.makedirs(vqa_images, exist_ok=True)
  questions, annotations = [], []
  for k, im in enumerate(photos[:3] + digits[4:7]):
    img = Image.open(os.path.join(folder, im["rel"])).convert("RGB")
    image_id = 4000 + k
    rec = {"image_id": image_id, "question_id": image_id * 10, "question": (
        "Which digit is this?" if im["kind"] == "digit" else "What is in the picture?")}
    if k % 2:
      img.save(os.path.join(vqa_images, f"COCO_val2014_{image_id:012d}.jpg"), quality=90)
    else:
      rec["image"] = f"user_{k}.jpg"
      img.save(os.path.join(vqa_images, rec["image"]), quality=90)
    answer = str(im["digit"]) if im["kind"] == "digit" else im["label"]
    questions.append(rec)
    annotations.append({"question_id": rec["question_id"], "image_id": image_id,
                        "answers": [{"answer": answer, "answer_id": j + 1} for j in range(10)],
                        "multiple_choice_answer": answer,
                        "answer_type": "number" if im["kind"] == "digit" else "other",
                        "question_type": "which" if im["kind"] == "digit" else "what is"})
  vqa = os.path.join(root, "vqav2")
  out["vqav2_questions"] = _dump({"questions": questions, "data_subtype": "val2014",
                                  "task_type": "Open-Ended", "data_type": "mscoco"},
                                 os.path.join(vqa, "questions.json"))
  out["vqav2_annotations"] = _dump({"annotations": annotations, "data_subtype": "val2014"},
                                   os.path.join(vqa, "annotations.json"))
  out["vqav2_image_folder"] = vqa_images
  return out


def _heldout_records(held: list[dict]) -> list[dict]:
  """The end-of-run evaluation: one question per record, "type" and "answer" fields."""
  recs = []
  for k, im in enumerate(held):
    if im["kind"] == "digit":
      items = [("digit", "Which digit is this?", str(im["digit"])),
               ("kind", "Is this a photo or a digit?", "a digit")]
    else:
      items = [("kind", "Is this a photo or a digit?", "a photo"),
               ("flip", "Is the image flipped?", "yes" if im["flipped"] else "no")]
      if im["tint"]:
        items.append(("colour", "What is the main colour of this image?" + SHORT, im["tint"]))
    for j, (kind, q, a) in enumerate(items):
      recs.append({"id": f"heldout-{k}-{j}", "image": im["rel"], "conversations": _conv((q, a)),
                   "type": kind, "answer": a})
  return recs


def write(root: str, seed: int = 0) -> dict:
  """Writes the dataset under `root` (see the module docstring); -> paths and expectations."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, "images")
  images = _images(folder, seed)
  train = [im for im in images if not im["heldout"]]
  held = [im for im in images if im["heldout"]]

  captions = [{"id": f"cap-{k}", "image": im["rel"],
               "conversations": [{"from": "human", "value": "<image>\n"},
                                 {"from": "gpt", "value": _caption(im)}]}
              for k, im in enumerate(train)]

  good = []
  for k, im in enumerate(train):
    qs = _questions(im, rng)
    picks = rng.permutation(len(qs))[:1 + int(k % 3 == 0)]  # Every third: two rounds.
    good.append({"id": f"q-{k}", "image": im["rel"],
                 "conversations": _conv(*[qs[j] for j in picks])})
  for k, (q, a) in enumerate(TEXT_ONLY):
    good.append({"id": f"text-{k}", "conversations": _conv((q, a), image=False)})
  order = rng.permutation(len(good))
  good = [good[i] for i in order]

  files = _broken_files(folder, os.path.join(folder, train[0]["rel"]),
                        os.path.join(folder, next(im["rel"] for im in train
                                                  if im["kind"] == "digit")))
  good_image = next(im["rel"] for im in train if im["kind"] == "photo")
  broken = _broken_records(files, good_image, dup_of=good[7])
  records = list(good)
  # Spread the broken records out; the first one sits at index 3, the duplicate id last.
  for n, (_, rec) in enumerate(broken):
    records.insert(3 + 6 * n, rec)
  where = {id(rec): i for i, rec in enumerate(records)}
  listed = sorted(({"index": where[id(rec)], "id": rec["id"], "reason": reason}
                   for reason, rec in broken), key=lambda b: b["index"])
  expected = {r: sum(b["reason"] == r for b in listed) for r in REASONS}

  train_text = json.dumps(records, indent=1)
  train_json = os.path.join(root, "train.json")
  with open(train_json, "w", encoding="utf-8") as f:
    f.write(train_text)
  heldout = _heldout_records(held)
  out = {
      "root": root, "image_folder": folder,
      "captions_json": _dump(captions, os.path.join(root, "captions.json")),
      "train_json": train_json,
      "heldout_json": _dump(heldout, os.path.join(root, "heldout.json")),
      "heldout_image": os.path.join(folder, next(im["rel"] for im in held
                                                 if im["kind"] == "digit")),
      "malformed": _malformed(train_text, os.path.join(root, "train_malformed.json")),
      "expected_skipped": expected, "broken": listed, "first_broken": listed[0],
      "n_records": len(records), "n_good": len(good), "n_captions": len(captions),
      "n_rounds": sum(len(r["conversations"]) // 2 for r in good) + len(broken),
      "n_good_rounds": sum(len(r["conversations"]) // 2 for r in good),
      "n_images": len(images),
      "eval_types": {t: sum(r["type"] == t for r in heldout)
                     for t in sorted({r["type"] for r in heldout})},
  }
  out.update(_benchmarks(root, folder, held, rng))
  return out
