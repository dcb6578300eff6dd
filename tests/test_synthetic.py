"""The synthetic dataset: determinism, answers true to the scene, pixels, file formats."""
import collections
import hashlib
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data import synthetic as S

SEED = 3
SMALL = dict(n_caption=40, n_instruct=160, n_eval_per_type=12)


def _index(rec):
  return int(re.fullmatch(r"images/\w+/(\d+)\.png", rec["image"]).group(1))


def _find(scene, color=None, shape=None, size=None):
  return [o for o in scene.objects if (color is None or o.color == color)
          and (shape is None or o.shape == shape) and (size is None or o.size == size)]


def _one(scene, **kw):
  found = _find(scene, **kw)
  assert len(found) == 1, (kw, scene)
  return found[0]


def _combo_words(text):
  """'red circle' -> dict(color=..., shape=...)."""
  color, shape = text.split()
  assert color in S.COLORS and shape in S.SHAPES, text
  return dict(color=color, shape=shape)


def check_answer(scene, qtype, question, answer, rec):
  """Recomputes the answer of one question from the scene alone."""
  q = question.replace("<image>\n", "")
  if qtype == "colour":
    m = re.fullmatch(r"What color is the (?:(small|large) )?(\w+)\?(\n.*)?", q, re.S)
    assert m, q
    o = _one(scene, size=m.group(1), shape=m.group(2))
    assert answer == o.color
  elif qtype == "count":
    m = re.fullmatch(r"How many (?:(\w+) )?objects are there\?(\n.*)?", q, re.S)
    assert m, q
    assert answer == str(len(_find(scene, color=m.group(1))))
  elif qtype == "position":
    m = re.fullmatch(r"Is the (\w+ \w+) (to the left or right of|above or below) the (\w+ \w+)\?"
                     r"(\n.*)?", q, re.S)
    assert m, q
    a, b = _one(scene, **_combo_words(m.group(1))), _one(scene, **_combo_words(m.group(3)))
    if m.group(2).startswith("to the left"):
      assert a.col != b.col
      assert answer == ("left" if a.x < b.x else "right")
    else:
      assert a.row != b.row
      assert answer == ("above" if a.y < b.y else "below")
  elif qtype == "exist":
    m = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?(\n.*)?", q, re.S)
    assert m, q
    combo = tuple(_combo_words(m.group(1)).values())
    present = {(o.color, o.shape) for o in scene.objects}
    assert answer == ("yes" if combo in present else "no")
    if "neg_kind" in rec:
      check_negative(scene, combo, rec["neg_kind"] if answer == "no" else None, k=1)
  elif qtype == "choice":
    lines = q.split("\n")
    assert lines[-1] == "Answer with the option's letter from the given choices directly."
    options = [re.fullmatch(r"([A-D])\. (.+)", line).group(2) for line in lines[1:-1]]
    assert 3 <= len(options) <= 4 and len(set(options)) == len(options)
    if "choices" in rec:
      assert rec["choices"] == options
    stem = lines[0]
    right = [opt for opt in options if choice_correct(scene, stem, opt)]
    assert len(right) == 1, (stem, options, scene)
    assert answer == "ABCD"[options.index(right[0])]
  elif qtype == "short":
    stem, suffix = q.split("\n")
    assert suffix == "Answer the question using a single word or phrase."
    if m := re.fullmatch(r"What shape is the (\w+) object\?", stem):
      word = m.group(1)
      o = _one(scene, **({"size": word} if word in S.SIZES else {"color": word}))
      assert answer == o.shape
    elif m := re.fullmatch(r"What size is the (\w+ \w+)\?", stem):
      assert answer == _one(scene, **_combo_words(m.group(1))).size
    elif m := re.fullmatch(r"Which row is the (\w+ \w+) in\?", stem):
      assert answer == ("top", "middle", "bottom")[_one(scene, **_combo_words(m.group(1))).row]
    elif m := re.fullmatch(r"Which column is the (\w+ \w+) in\?", stem):
      assert answer == ("left", "center", "right")[_one(scene, **_combo_words(m.group(1))).col]
    else:
      raise AssertionError(stem)
  elif qtype == "any":
    m = re.fullmatch(r"Is there anything (\w+) in the image\?(\n.*)?", q, re.S)
    assert m and m.group(1) in S.COLORS, q
    assert answer == ("yes" if any(o.color == m.group(1) for o in scene.objects) else "no")
  elif qtype == "most":
    assert re.fullmatch(r"Which color is most common in the image\?(\n.*)?", q, re.S), q
    counts = collections.Counter(o.color for o in scene.objects)
    top = max(counts.values())
    assert [c for c, n in counts.items() if n == top] == [answer], (counts, answer)
  else:
    raise AssertionError(qtype)


def choice_correct(scene, stem, option):
  if m := re.fullmatch(r"What color is the (\w+)\?", stem):
    return _one(scene, shape=m.group(1)).color == option
  if stem == "Which of these shapes is in the image?":
    return bool(_find(scene, shape=option))
  if m := re.fullmatch(r"Where is the (\w+ \w+)\?", stem):
    o = _one(scene, **_combo_words(m.group(1)))
    return option == S.POSITION_NAMES[o.row][o.col]
  if stem == "How many objects are in the image?":
    return option == str(len(scene.objects))
  raise AssertionError(stem)


def check_negative(scene, combo, neg_kind, k):
  """POPE negative rules; neg_kind None for a positive."""
  present = {(o.color, o.shape) for o in scene.objects}
  if neg_kind is None:
    assert combo in present
    return
  assert combo not in present
  if neg_kind == "popular":
    absent = [c for c in S.COMBO_RANK if c not in present]
    assert absent.index(combo) < max(k, 3), (combo, absent[:4])
  elif neg_kind == "adversarial":
    assert any(combo[0] == c or combo[1] == s for c, s in present)
  else:
    assert neg_kind == "random"


# ---------------------------------------------------------------------------


def test_deterministic_per_sample():
  for split in ("captions", "instruct", "eval"):
    a = [r for r, _ in S.iter_records(SEED, split, 20)]
    b = [r for r, _ in S.iter_records(SEED, split, 10, start=10)]
    assert a[10:] == b  # Any sample regenerates alone.
    assert a == [S.sample(SEED, split, i)[0] for i in range(20)]
    c = [r for r, _ in S.iter_records(SEED + 1, split, 20)]
    assert a != c
  for i in range(5):
    s1, s2 = S.make_scene(SEED, "instruct", i), S.make_scene(SEED, "instruct", i)
    if s1 is None:
      assert s2 is None
      continue
    assert S.png_bytes(S.render(s1)) == S.png_bytes(S.render(s2))
  im1 = [S.png_bytes(im) for _, im in S.iter_records(SEED, "captions", 5)]
  im2 = [S.png_bytes(im) for _, im in S.iter_records(SEED + 1, "captions", 5)]
  assert all(x != y for x, y in zip(im1, im2))


def test_no_global_state():
  np.random.seed(0)
  a = S.instruct_sample(SEED, "instruct", 7)
  np.random.seed(1)
  np.random.random(100)
  assert S.instruct_sample(SEED, "instruct", 7) == a


def test_scene_geometry():
  for i in range(300):
    scene = S.make_scene(SEED, "captions", i)
    assert 1 <= len(scene.objects) <= S.MAX_OBJECTS
    cells = [(o.row, o.col) for o in scene.objects]
    assert len(set(cells)) == len(cells) and cells == sorted(cells)
    for o in scene.objects:  # Inside its grid cell, so objects never overlap.
      assert o.col / 3 <= o.x - o.radius and o.x + o.radius <= (o.col + 1) / 3
      assert o.row / 3 <= o.y - o.radius and o.y + o.radius <= (o.row + 1) / 3


@pytest.mark.parametrize("size", [64, 336])
def test_pixels_show_objects(size):
  rgb = set(S.COLOR_RGB.values())
  for i in range(40):
    scene = S.make_scene(SEED, "eval", i, image_size=size)
    a = np.asarray(S.render(scene))
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    for o in scene.objects:
      cx, cy = int(o.x * size), int(o.y * size)
      patch = a[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3)
      assert (patch == S.COLOR_RGB[o.color]).all(), (o, patch)
    used = {(o.row, o.col) for o in scene.objects}
    for r in range(3):
      for c in range(3):
        if (r, c) not in used:  # An empty cell shows background only.
          cell = a[r * size // 3:(r + 1) * size // 3, c * size // 3:(c + 1) * size // 3]
          assert not any((cell == col).all(-1).any() for col in rgb)


def test_shapes_are_outlined_and_the_outline_tells_them_apart():
  """Each object is ringed by the dark outline colour (none in an empty cell), and the
  ring alone names the shape: no two shapes of a size share their outline mask."""
  dark = np.array(S.OUTLINE_RGB)
  masks = {}
  for i in range(60):
    scene = S.make_scene(SEED, "eval", i, image_size=72)
    a = np.asarray(S.render(scene)).astype(int)
    for o in scene.objects:
      cell = a[o.row * 24:(o.row + 1) * 24, o.col * 24:(o.col + 1) * 24]
      ring = (np.abs(cell - dark).sum(-1) == 0)
      assert ring.sum() >= 12, (o, ring.sum())
      masks.setdefault((o.size, o.shape), ring)
  for size in S.SIZES:
    got = [masks[(size, sh)] for sh in S.SHAPES if (size, sh) in masks]
    assert len(got) >= 4
    for x in range(len(got)):
      for y in range(x):
        assert (got[x] != got[y]).sum() >= 4


def test_palette_is_distinct_and_named_right():
  rgb = {k: np.array(v, float) for k, v in S.COLOR_RGB.items()}
  assert set(rgb) == set(S.COLORS)
  for a in S.COLORS:
    for b in S.COLORS:
      if a < b:
        assert np.abs(rgb[a] - rgb[b]).sum() > 80, (a, b)
    # Saturated, unlike the background (greys in [65, 194], tinted by at most 12).
    spread = rgb[a].max() - rgb[a].min()
    assert spread > 80, a
  r, g, b = (dict(zip(S.COLORS, (v[i] for v in rgb.values()))) for i in range(3))
  assert r["red"] > 2 * max(g["red"], b["red"])
  assert g["green"] > 2 * max(r["green"], b["green"])
  assert b["blue"] > 2 * max(r["blue"], g["blue"])
  assert min(r["yellow"], g["yellow"]) > 4 * b["yellow"]
  assert min(r["purple"], b["purple"]) > 2 * g["purple"]
  assert r["orange"] > g["orange"] > 2 * b["orange"]


def test_png_bytes_round_trip():
  im = S.render(S.make_scene(SEED, "eval", 4))
  back = Image.open(io.BytesIO(S.png_bytes(im)))
  assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(im))


def test_caption_names_every_object():
  for i in range(100):
    rec = S.caption_sample(SEED, "captions", i)
    scene = S.make_scene(SEED, "captions", i)
    human, gpt = rec["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert human["value"][len("<image>\n"):] in S.CAPTION_REQUESTS
    cap = gpt["value"]
    assert cap.startswith(f"There {'is' if len(scene.objects) == 1 else 'are'} "
                          f"{len(scene.objects)} object")
    for o in scene.objects:
      pos = S.POSITION_NAMES[o.row][o.col]
      assert f"a {o.size} {o.color} {o.shape} in the {pos}" in cap
    assert len(re.findall(r"\ba (?:small|large) ", cap)) == len(scene.objects)


def test_caption_order_is_drawn_per_caption():
  """SHUFFLE_CAPTIONS: objects are named in an order drawn per caption (so the
  object after "a large red" is found by content, not by reading order): over 200
  captions with 3+ objects, both reading order and other orders occur, and the
  same sample always gets the same caption."""
  reading = other = 0
  for i in range(200):
    scene = S.make_scene(SEED, "captions", i)
    if len(scene.objects) < 3:
      continue
    cap = S.caption_sample(SEED, "captions", i)["conversations"][1]["value"]
    assert cap == S.caption_sample(SEED, "captions", i)["conversations"][1]["value"]
    at = [cap.index(o.describe()) for o in scene.objects]
    reading, other = (reading + 1, other) if at == sorted(at) else (reading, other + 1)
  assert reading > 0 and (other > 0) == S.SHUFFLE_CAPTIONS, (reading, other)


def test_instruct_answers_true_to_scene():
  types = collections.Counter()
  for i in range(1500):
    rec, scene = S.sample(SEED, "instruct", i)
    types[rec["type"]] += 1
    conv = rec["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    if rec["type"] == "text":
      assert scene is None and "image" not in rec and "<image>" not in conv[0]["value"]
      q, a = conv[0]["value"], conv[1]["value"]
      if m := re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", q):
        x, y = int(m.group(1)), int(m.group(3))
        assert a == str(x + y if m.group(2) == "plus" else x - y)
      elif m := re.fullmatch(r"Which number is larger, (\d) or (\d)\?", q):
        assert a == max(m.group(1), m.group(2))
      continue
    assert rec["image"] == f"images/instruct/{i}.png"
    assert conv[0]["value"].startswith("<image>\n")
    assert sum(t["value"].count("<image>") for t in conv) == 1
    qtypes = rec["types"] if rec["type"] == "multi" else [rec["type"]]
    assert len(qtypes) == len(conv) // 2
    for n, t in enumerate(qtypes):
      answer = conv[2 * n + 1]["value"]
      assert len(answer.split()) == 1
      check_answer(scene, t, conv[2 * n]["value"], answer, rec if t == rec["type"] else {})
  assert set(types) == set(S.IMAGE_TYPES) | {"multi", "text"}
  assert 0.02 < types["text"] / 1500 < 0.12 and 0.6 < types["multi"] / 1500 < 0.85
  assert all(types[t] > 15 for t in S.IMAGE_TYPES)  # Single questions of every type too.


def test_instruct_conversations_fit_tiny_max_len():
  """Questions per conversation stay within TURN_CHAR_BUDGET, so the built-in
  default (max_len 160) never truncates one; every image type opens some."""
  first, turns = collections.Counter(), collections.Counter()
  for i in range(600):
    rec = S.instruct_sample(SEED, "instruct", i)
    if rec["type"] == "text":
      continue
    qs = [t["value"].replace("<image>\n", "") for t in rec["conversations"][0::2]]
    assert len(qs) <= 4 and sum(map(len, qs)) <= S.TURN_CHAR_BUDGET or len(qs) == 1
    types = rec["types"] if rec["type"] == "multi" else [rec["type"]]
    assert len(set(types)) == len(types)
    first[types[0]] += 1
    turns[len(qs)] += 1
  assert set(first) == set(S.IMAGE_TYPES) and min(first.values()) > 50
  assert sum(n * c for n, c in turns.items()) / sum(turns.values()) > 2.2


def test_eval_answers_and_balance():
  n = len(S.IMAGE_TYPES) * 30
  recs = [S.sample(SEED, "eval", i) for i in range(n)]
  kinds = collections.Counter()
  for rec, scene in recs:
    conv = rec["conversations"]
    assert len(conv) == 2 and conv[1]["value"] == rec["answer"]
    check_answer(scene, rec["type"], conv[0]["value"], rec["answer"], rec)
    if rec["type"] == "exist":
      kinds[(rec["answer"], rec["neg_kind"])] += 1
    if rec["type"] in ("colour", "count", "position", "exist", "any", "most"):
      assert "\n" not in conv[0]["value"][len("<image>\n"):]  # Asked bare.
  assert collections.Counter(r["type"] for r, _ in recs) == {t: 30 for t in S.IMAGE_TYPES}
  assert kinds[("yes", None)] == 15
  assert all(kinds[("no", k)] == 5 for k in S.NEG_KINDS)
  pos = collections.Counter(r["answer"] for r, _ in recs if r["type"] == "position")
  assert abs(pos["left"] - pos["right"]) <= 1 and abs(pos["above"] - pos["below"]) <= 1
  letters = collections.Counter(r["answer"] for r, _ in recs if r["type"] == "choice")
  assert max(letters.values()) <= 30 / 3 + 2
  anys = collections.Counter(r["answer"] for r, _ in recs if r["type"] == "any")
  assert anys == {"yes": 15, "no": 15}  # Balanced by construction.


def test_negatives_follow_their_rules():
  rng = np.random.default_rng(0)
  for i in range(200):
    scene = S.make_scene(SEED, "captions", i)
    present = {(o.color, o.shape) for o in scene.objects}
    for kind in S.NEG_KINDS:
      for k in (1, 3):
        neg = S.negatives(present, kind, rng, k)
        assert len(neg) == k and len(set(neg)) == k
        for combo in neg:
          check_negative(scene, combo, kind, k)


def test_popular_ranking_matches_training_frequencies():
  counts = collections.Counter()
  for i in range(3000):
    counts.update((o.color, o.shape) for o in S.make_scene(SEED, "captions", i).objects)
  top = [c for c, _ in counts.most_common(3)]
  assert top[0] in S.COMBO_RANK[:3]
  assert set(top) <= set(S.COMBO_RANK[:6])
  bottom = min(counts, key=counts.get)
  assert bottom in S.COMBO_RANK[-6:]


def test_corpus_text():
  lines = S.corpus_text(SEED, 50)
  text = "\n".join(lines)
  assert "<image>" not in text
  for word in S.COLORS + S.SHAPES + ("USER:", "ASSISTANT:", "left", "above", "yes"):
    assert word in text
  assert "Answer the question using a single word or phrase." in lines


def test_unknown_split_needs_kind():
  with pytest.raises(ValueError):
    next(S.iter_records(0, "other", 1))
  rec, im = next(S.iter_records(0, "other", 1, kind="caption"))
  assert rec["image"] == "images/other/0.png" and im.size == (64, 64)


# ---------------------------------------------------------------------------
# generate(): files on disk.


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synth"))
  S.generate(d, seed=SEED, **SMALL)
  return d


def _load(out, name):
  with open(os.path.join(out, name)) as f:
    return json.load(f)


def _jsonl(out, name):
  with open(os.path.join(out, name)) as f:
    return [json.loads(line) for line in f]


def test_generate_is_deterministic(out, tmp_path):
  S.generate(str(tmp_path), seed=SEED, **SMALL)
  for name in ("captions.json", "instruct.json", "eval.json", "dataset_info.json",
               "pope/synthetic_pope_popular.json", "images/instruct/5.png", "images/eval/7.png"):
    with open(os.path.join(out, name), "rb") as f, open(tmp_path / name, "rb") as g:
      assert f.read() == g.read(), name


def test_llava_files(out):
  for name, n in (("captions.json", SMALL["n_caption"]), ("instruct.json", SMALL["n_instruct"]),
                  ("eval.json", len(S.IMAGE_TYPES) * SMALL["n_eval_per_type"])):
    recs = _load(out, name)
    assert len(recs) == n and len({r["id"] for r in recs}) == n
    for r in recs:
      assert isinstance(r["id"], str) and r["conversations"][0]["from"] == "human"
      if "image" in r:
        assert os.path.exists(os.path.join(out, r["image"]))
        assert r["conversations"][0]["value"].startswith("<image>\n")
  for r in _load(out, "eval.json"):
    assert r["conversations"][1]["value"] == r["answer"] and r["type"] in S.IMAGE_TYPES
    scene = S.make_scene(SEED, "eval", _index(r))
    check_answer(scene, r["type"], r["conversations"][0]["value"], r["answer"], r)
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, r["image"]))),
                          np.asarray(S.render(scene)))


def _hashes(out, split):
  folder = os.path.join(out, "images", split)
  hs = set()
  for name in os.listdir(folder):
    pixels = np.asarray(Image.open(os.path.join(folder, name)))
    hs.add(hashlib.sha1(pixels.tobytes()).hexdigest())
  return hs


def test_heldout_images_disjoint_from_training(out):
  train = _hashes(out, "captions") | _hashes(out, "instruct")
  for split in S.HELDOUT_SPLITS:
    held = _hashes(out, split)
    assert held and not held & train, split
  train_paths = {r.get("image") for n in ("captions.json", "instruct.json") for r in _load(out, n)}
  assert not train_paths & {r["image"] for r in _load(out, "eval.json")}


def test_pope_files(out):
  splits = {k: _jsonl(out, f"pope/synthetic_pope_{k}.json") for k in S.NEG_KINDS}
  n = len(splits["random"])
  assert n >= SMALL["n_eval_per_type"]
  for kind, qs in splits.items():
    assert len(qs) == n
    assert sorted(q["question_id"] for q in qs) == list(range(n))
    labels = collections.Counter(q["label"] for q in qs)
    assert labels["yes"] == labels["no"] == n // 2  # Balanced.
    for q in qs:
      assert set(q) >= {"question_id", "image", "text", "label"}
      assert os.path.exists(os.path.join(out, q["image"]))
      scene = S.make_scene(SEED, "pope", _index(q))
      m = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", q["text"])
      combo = tuple(_combo_words(m.group(1)).values())
      present = {(o.color, o.shape) for o in scene.objects}
      assert q["label"] == ("yes" if combo in present else "no")
      k = min(3, len(present))
      check_negative(scene, combo, kind if q["label"] == "no" else None, k)
  # The positives are shared across the three files, as in POPE.
  pos = {k: [(q["image"], q["text"]) for q in qs if q["label"] == "yes"]
         for k, qs in splits.items()}
  assert pos["random"] == pos["popular"] == pos["adversarial"]


def test_scienceqa_files(out):
  problems = _load(out, "scienceqa/problems.json")
  splits = _load(out, "scienceqa/pid_splits.json")
  llava = _load(out, "scienceqa/llava_test.json")
  assert len(problems) == SMALL["n_eval_per_type"]
  assert sorted(splits["test"]) == sorted(problems)
  assert [r["id"] for r in llava] == splits["test"]
  for r in llava:
    p = problems[r["id"]]
    assert p["split"] == "test" and 0 <= p["answer"] < len(p["choices"])
    assert r["image"] == p["image"] and os.path.exists(os.path.join(out, p["image"]))
    human = r["conversations"][0]["value"]
    lines = human.split("\n")
    assert lines[0] == "<image>" and lines[1] == p["question"]
    assert lines[2:-1] == [f"{'ABCD'[i]}. {c}" for i, c in enumerate(p["choices"])]
    scene = S.make_scene(SEED, "scienceqa", _index(p))
    check_answer(scene, "choice", human, "ABCD"[p["answer"]], {"choices": p["choices"]})


def test_vqa_files(out):
  questions = _load(out, "vqa/questions.json")["questions"]
  anns = {a["question_id"]: a for a in _load(out, "vqa/annotations.json")["annotations"]}
  assert len(questions) >= SMALL["n_eval_per_type"]
  assert {q["question_id"] for q in questions} == set(anns)
  types = {"colour": "colour", "short": "short", "count": "count", "exist": "exist"}
  for q in questions:
    a = anns[q["question_id"]]
    assert a["image_id"] == q["image_id"]
    assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
    assert all(x["answer"] == a["multiple_choice_answer"] for x in a["answers"])
    assert a["answer_type"] in ("yes/no", "number", "other")
    assert os.path.exists(os.path.join(out, f"images/vqa/{q['image_id']}.png"))
    scene = S.make_scene(SEED, "vqa", q["image_id"])
    text = q["question"] + ("\nAnswer the question using a single word or phrase."
                            if a["question_type"] == "short" else "")
    check_answer(scene, types[a["question_type"]], text, a["multiple_choice_answer"], {})


def test_gqa_file(out):
  gqa = _load(out, "gqa/testdev_balanced_questions.json")
  assert len(gqa) == SMALL["n_eval_per_type"]
  kinds = collections.Counter()
  for qid, q in gqa.items():
    assert set(q) >= {"imageId", "question", "answer", "fullAnswer"}
    scene = S.make_scene(SEED, "gqa", int(q["imageId"]))
    t = "colour" if q["question"].startswith("What color") else "position"
    kinds[t] += 1
    check_answer(scene, t, q["question"], q["answer"], {})
    assert q["answer"] in q["fullAnswer"] or q["answer"] in ("left", "right")
  assert kinds["colour"] and kinds["position"]


def test_dataset_info_chance_matches_data(out):
  info = _load(out, "dataset_info.json")
  evals = _load(out, "eval.json")
  assert info["seed"] == SEED and info["image_size"] == 64
  assert info["counts"]["eval"] == len(evals)
  assert info["counts"]["images"]["eval"] == len(evals)
  nimg = sum(1 for r in _load(out, "instruct.json") if "image" in r)
  assert info["counts"]["images"]["instruct"] == nimg
  # Recomputed here: majority answer given the question's form, and 1 / #answers.
  groups = collections.defaultdict(collections.Counter)
  per_type = collections.Counter(r["type"] for r in evals)
  uniform = collections.defaultdict(float)
  n_ans = {"colour": 6, "position": 2, "exist": 2, "any": 2, "most": 6}
  for r in evals:
    form = r["n_options"] if r["type"] == "choice" else r["subtype"]
    groups[(r["type"], form)][r["answer"]] += 1
    if r["type"] == "choice":
      k = len(r["choices"])
    elif r["type"] == "count":
      k = 4 if r["subtype"] == "all" else 5
    elif r["type"] == "short":
      k = {"shape": 5, "size": 2, "row": 3, "column": 3}[r["subtype"]]
    else:
      k = n_ans[r["type"]]
    uniform[r["type"]] += 1 / k / per_type[r["type"]]
  for t in S.IMAGE_TYPES:
    major = sum(max(c.values()) for (tt, _), c in groups.items() if tt == t) / per_type[t]
    assert info["chance"][t] == pytest.approx(major), t
    assert info["chance_uniform"][t] == pytest.approx(uniform[t]), t
    assert info["chance"][t] >= info["chance_uniform"][t] - 1e-9
  assert info["chance_uniform"]["colour"] == pytest.approx(1 / 6)
  assert info["chance_uniform"]["exist"] == 0.5
  assert info["chance"]["exist"] == 0.5  # Labels balanced by construction.
