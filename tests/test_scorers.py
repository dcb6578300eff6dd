"""Benchmark loaders and scorers: answer rules, hand-computed metrics, file errors."""
import base64
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data import synthetic
from mqt import config_lib
from mqt.benchmarks import registry
from mqt.benchmarks.baselines import question_prefix
from mqt.benchmarks.common import Question, parse_letter
from mqt.benchmarks.gqa import load_gqa, score_gqa
from mqt.benchmarks.mmbench import load_mmbench, mmbench_choice, score_mmbench
from mqt.benchmarks.mme import load_mme, mme_yes_no, score_mme
from mqt.benchmarks.pope import load_pope, pope_yes_no, score_pope
from mqt.benchmarks.scienceqa import load_scienceqa, score_scienceqa
from mqt.benchmarks.synthetic import load_synthetic, score_synthetic
from mqt.benchmarks.textvqa import load_textvqa, score_textvqa
from mqt.benchmarks.vizwiz import load_vizwiz, score_vizwiz
from mqt.benchmarks.vqa_answers import normalize_vqa_answer, vqa_soft_accuracy
from mqt.benchmarks.vqav2 import load_vqav2, score_vqav2
from mqt.benchmarks.table import Column, Row, format_table

SHORT = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."


def _png(path, color=(200, 30, 30)) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (4, 4), color).save(path)
  return str(path)


def _write(path, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _json(path, obj) -> str:
  return _write(path, json.dumps(obj))


# ---------------------------------------------------------------------------
# VQA normalization and soft accuracy.

@pytest.mark.parametrize("text, want", [
    ("Two", "2"),
    ("none", "0"),
    ("Ten dogs", "10 dogs"),
    ("the dog.", "dog"),          # Article dropped, final period deleted.
    ("An apple", "apple"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("2.5", "2.5"),               # A period before a digit stays.
    ("5.", "5"),
    ("yes!", "yes"),              # "!" touches no space: becomes a space, then split away.
    ("a red, blue", "red blue"),  # ", " touches a space: deleted.
    ("red,blue", "red blue"),     # No space next to it: becomes a space.
    ("1,000", "1000"),            # A digit,digit group: all punctuation deleted.
    ("1,000 t-shirts", "1000 tshirts"),
    ("t-shirt", "t shirt"),
    ("\tYes\n", "yes"),
    ("  left\tof\nit ", "left of it"),
])
def test_normalize_vqa_answer(text, want):
  assert normalize_vqa_answer(text) == want


@pytest.mark.parametrize("matches, want", [
    (10, 1.0),
    (4, 1.0),  # Leaving out any one answer leaves >= 3 matches.
    (3, 0.9),  # Out a match: 2/3 (x3); out a non-match: 3/3 (x7): (3 * 2/3 + 7) / 10.
    (2, 0.6),  # Out a match: 1/3 (x2); out a non-match: 2/3 (x8): (2/3 + 16/3) / 10.
    (1, 0.3),  # Out the match: 0 (x1); out a non-match: 1/3 (x9): (0 + 3) / 10.
    (0, 0.0),
])
def test_vqa_soft_accuracy_counts(matches, want):
  answers = ["cat"] * matches + ["dog"] * (10 - matches)
  assert vqa_soft_accuracy("cat", answers) == pytest.approx(want)


def test_vqa_soft_accuracy_normalization_rules():
  # The answers differ, so they are normalized too: "two", "Two." and "2" all match "2".
  answers = ["two", "Two.", "2"] + ["3"] * 7
  assert vqa_soft_accuracy("2", answers) == pytest.approx(0.9)
  assert vqa_soft_accuracy("2", answers, normalize_answers=False) == pytest.approx(0.3)
  # The prediction is always normalized.
  assert vqa_soft_accuracy("The cat.", ["cat"] * 10) == 1.0
  # The official rule leaves unanimous answers as they are; TextVQA (m4c) normalizes them.
  assert vqa_soft_accuracy("Two", ["Two"] * 10) == 0.0
  assert vqa_soft_accuracy("Two", ["Two"] * 10, normalize_answers=True) == 1.0


# ---------------------------------------------------------------------------
# Multiple choice letters.

@pytest.mark.parametrize("pred, n, want", [
    ("A", 4, "A"),
    (" B ", 4, "B"),
    ("B.", 4, "B"),
    ("C. blue", 4, "C"),
    ("D)", 4, "D"),
    ("(C)", 4, "C"),
    ("(B) red", 4, "B"),
    ("A blue square", 4, "A"),
    ("The answer is D.", 4, "D"),   # LLaVA's ScienceQA eval accepts this form.
    ("I think the answer is (B)", 4, "B"),
    ("E", 4, None),                 # Not an option.
    ("E.", 4, None),
    ("E", 5, "E"),
    ("a", 4, None),                 # Lower case is not a letter.
    ("blue", 4, None),
    ("", 4, None),
    ("The answer is A or the answer is B", 4, None),  # Ambiguous.
])
def test_parse_letter(pred, n, want):
  assert parse_letter(pred, n) == want


# ---------------------------------------------------------------------------
# ScienceQA.

def _scienceqa_files(tmp_path):
  images = tmp_path / "images"
  _png(images / "test" / "1" / "image.png")      # The release layout.
  _png(tmp_path / "images" / "flat" / "2.png")   # A path relative to the image folder.
  problems = {
      "1": {"question": "Which color?", "choices": ["red", "blue", "green"], "answer": 1,
            "hint": "Look closely.", "image": "image.png", "split": "test",
            "subject": "natural science"},
      "2": {"question": "Which shape?", "choices": ["circle", "square"], "answer": 0,
            "hint": "", "image": "flat/2.png", "split": "test", "subject": "language science"},
      "3": {"question": "No image here?", "choices": ["yes", "no"], "answer": 0, "hint": "",
            "image": None, "split": "test"},
      "4": {"question": "Train only", "choices": ["a", "b"], "answer": 0, "hint": "",
            "image": "image.png", "split": "train"},
  }
  p = _json(tmp_path / "problems.json", problems)
  s = _json(tmp_path / "pid_splits.json", {"test": ["1", "2", "3"], "train": ["4"]})
  return p, s, str(images)


def test_scienceqa_load_and_score(tmp_path):
  p, s, images = _scienceqa_files(tmp_path)
  qs = load_scienceqa(p, s, images)
  assert [q.qid for q in qs] == ["1", "2"]  # "3" has no image; "4" is not in test.
  assert qs[0].prompt == ("Context: Look closely.\nWhich color?\nA. red\nB. blue\nC. green"
                          + CHOICE)
  assert qs[1].prompt == "Which shape?\nA. circle\nB. square" + CHOICE  # Empty hint: no Context.
  assert qs[0].image == str(tmp_path / "images" / "test" / "1" / "image.png")
  assert qs[1].image == str(tmp_path / "images" / "flat" / "2.png")
  assert [q.answer for q in qs] == ["B", "A"]
  m = score_scienceqa(qs, {"1": "B.", "2": "It is a circle"})
  assert m["accuracy"] == 0.5 and m["unparsed"] == 1 and m["n"] == 2
  assert m["subject/natural science"] == 1.0 and m["subject/language science"] == 0.0
  assert score_scienceqa(qs, {"1": "(B)", "2": "A"})["accuracy"] == 1.0
  assert score_scienceqa(qs, {"1": "C", "2": "D"})["unparsed"] == 1  # D: only 2 options.


# ---------------------------------------------------------------------------
# POPE.

@pytest.mark.parametrize("pred, want", [
    ("No, there is not.", "no"),
    ("Yes, there is a dog.", "yes"),
    ("There is no dog", "no"),
    ("I do not see one", "no"),
    ("NO", "no"),
    ("Nothing", "yes"),        # "nothing" is not the word "no".
    ("yes. no", "yes"),        # Only the first sentence counts.
    ("Yes", "yes"),
    ("", "yes"),
    ("No,there is none", "yes"),  # Commas are deleted, not split on: "nothere".
])
def test_pope_yes_no(pred, want):
  assert pope_yes_no(pred) == want


def _pope_split(tmp_path, name, labels):
  lines = [json.dumps({"question_id": i + 1, "image": f"img{i}.jpg", "text": f"Is there a {i}?",
                       "label": l, "category": name}) for i, l in enumerate(labels)]
  for i in range(len(labels)):
    if not (tmp_path / "img" / f"img{i}.jpg").exists():
      _png(tmp_path / "img" / f"img{i}.jpg")
  return _write(tmp_path / "pope" / f"coco_pope_{name}.json", "\n".join(lines) + "\n")


def test_pope_metrics_by_hand(tmp_path):
  _pope_split(tmp_path, "random", ["yes", "yes", "yes", "no", "no"])
  _pope_split(tmp_path, "popular", ["yes", "no"])
  qs = load_pope(str(tmp_path / "pope"), str(tmp_path / "img"))
  assert len(qs) == 7 and qs[0].prompt == "Is there a 0?" + SHORT
  assert {q.qid for q in qs} >= {"random/1", "popular/1"}
  preds = {"random/1": "Yes", "random/2": "Yes.", "random/3": "No",
           "random/4": "Yes, there is", "random/5": "There is not.",
           "popular/1": "yes", "popular/2": "no"}
  m = score_pope(qs, preds)
  # random: TP 2, FN 1, FP 1, TN 1.
  assert m["random/precision"] == pytest.approx(2 / 3)
  assert m["random/recall"] == pytest.approx(2 / 3)
  assert m["random/f1"] == pytest.approx(2 / 3)
  assert m["random/accuracy"] == pytest.approx(3 / 5)
  assert m["random/yes_ratio"] == pytest.approx(3 / 5)
  assert m["popular/f1"] == 1.0 and m["popular/accuracy"] == 1.0
  assert m["f1"] == pytest.approx((2 / 3 + 1) / 2)
  assert m["accuracy"] == pytest.approx((3 / 5 + 1) / 2)
  # Never "yes": precision, recall and F1 are 0 (no division by zero).
  m = score_pope(qs, {q: "No" for q in preds})
  assert m["f1"] == 0.0 and m["yes_ratio"] == 0.0 and m["accuracy"] == pytest.approx(
      (2 / 5 + 1 / 2) / 2)


def test_pope_accepts_a_dict_of_splits(tmp_path):
  path = _pope_split(tmp_path, "adversarial", ["yes", "no"])
  qs = load_pope({"adv": path}, tmp_path / "img")
  assert [q.qid for q in qs] == ["adv/1", "adv/2"] and qs[0].meta["split"] == "adv"


# ---------------------------------------------------------------------------
# MME.

def _mme_folder(root):
  # existence: images and .txt side by side.
  for name, qa in (("a", "Is it red? Please answer yes or no.\tYes\nIs it blue?\tNo\n"),
                   ("b", "Is there a cat?\tYes\nIs there a dog?\tNo\n")):
    _png(root / "existence" / f"{name}.jpg")
    _write(root / "existence" / f"{name}.txt", qa)
  # artwork: images/ + questions_answers_YN/.
  for name, qa in (("c", "Is this by Monet?\tNo\nIs this by Manet?\tYes\n"),
                   ("d", "Is it a portrait?\tYes\nIs it a landscape?\tNo")):
    _png(root / "artwork" / "images" / f"{name}.png")
    _write(root / "artwork" / "questions_answers_YN" / f"{name}.txt", qa)
  _png(root / "numerical_calculation" / "e.png")
  _write(root / "numerical_calculation" / "e.txt", "Is 1+1=2?\tYes\nIs 2+2=5?\tNo\n")
  _write(root / "eval_tool" / "readme.txt", "not a subtask")


@pytest.mark.parametrize("pred, want", [
    ("Yes", "yes"), ("yes, it is", "yes"), ("No.", "no"), (" no", "no"), ("NO", "no"),
    ("maybe", "other"), ("", "other"), ("I think yes", "other"),
])
def test_mme_yes_no(pred, want):
  assert mme_yes_no(pred) == want


def test_mme_scores_by_hand(tmp_path):
  _mme_folder(tmp_path)
  qs = load_mme(tmp_path)
  assert len(qs) == 10
  by_id = {q.qid: q for q in qs}
  assert by_id["existence/a/0"].prompt == "Is it red? Please answer yes or no."
  assert by_id["existence/a/0"].answer == "yes"
  assert by_id["artwork/c/1"].image == str(tmp_path / "artwork" / "images" / "c.png")
  preds = {
      "existence/a/0": "Yes", "existence/a/1": "No",           # Both right.
      "existence/b/0": "Yes", "existence/b/1": "Yes, it is",   # One right.
      "artwork/c/0": "No.", "artwork/c/1": "maybe",            # One right ("other").
      "artwork/d/0": "No", "artwork/d/1": "Yes",               # None right.
      "numerical_calculation/e/0": "yes", "numerical_calculation/e/1": "no",
  }
  m = score_mme(qs, preds)
  assert m["existence/acc"] == 75.0 and m["existence/acc_plus"] == 50.0
  assert m["existence/score"] == 125.0
  assert m["artwork/acc"] == 25.0 and m["artwork/acc_plus"] == 0.0 and m["artwork/score"] == 25.0
  assert m["numerical_calculation/score"] == 200.0
  assert m["perception"] == 150.0 and m["cognition"] == 200.0 and m["total"] == 350.0
  assert m["perception_subtasks"] == 2 and m["cognition_subtasks"] == 1 and m["other"] == 1
  assert "count/score" not in m


def test_mme_errors(tmp_path):
  _mme_folder(tmp_path)
  os.remove(tmp_path / "existence" / "b.jpg")
  with pytest.raises(FileNotFoundError, match=r"existence/b/0.*b\.<jpg\|png>"):
    load_mme(tmp_path)
  _png(tmp_path / "existence" / "b.jpg")
  _write(tmp_path / "existence" / "b.txt", "Is there a cat?\tMaybe\n")
  with pytest.raises(ValueError, match=r"b\.txt: line 1 answer 'Maybe'"):
    load_mme(tmp_path)
  with pytest.raises(FileNotFoundError, match="MME benchmark folder"):
    load_mme(tmp_path / "nope")


# ---------------------------------------------------------------------------
# GQA, VQAv2, TextVQA, VizWiz.

def test_gqa(tmp_path):
  _png(tmp_path / "img" / "n1.jpg")
  _png(tmp_path / "img" / "n2.jpg")
  path = _json(tmp_path / "testdev_balanced_questions.json", {
      "q1": {"imageId": "n1", "question": "What color is the car?", "answer": "red",
             "fullAnswer": "The car is red.", "types": {"structural": "query",
                                                        "detailed": "color"}},
      "q2": {"imageId": "n2", "question": "Is it left?", "answer": "left",
             "types": {"structural": "choose", "detailed": "place"}},
      "q3": {"imageId": "n1", "question": "What is it?", "answer": "car",
             "types": {"structural": "query", "detailed": "name"}},
  })
  qs = load_gqa(path, tmp_path / "img")
  assert qs[0].image == str(tmp_path / "img" / "n1.jpg")
  assert qs[0].prompt == "What color is the car?" + SHORT
  m = score_gqa(qs, {"q1": " Red. ", "q2": "Left", "q3": "the car"})
  assert m["accuracy"] == pytest.approx(2 / 3)
  assert m["structural/query"] == 0.5 and m["structural/choose"] == 1.0
  assert m["detailed/name"] == 0.0 and m["detailed/color"] == 1.0


def test_vqav2_textvqa_vizwiz(tmp_path):
  _png(tmp_path / "coco" / "COCO_val2014_000000000042.jpg")
  q = _json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
      {"image_id": 42, "question": "How many?", "question_id": 420},
      {"image_id": 42, "question": "What color?", "question_id": 421}]})
  a = _json(tmp_path / "a.json", {"annotations": [
      {"question_id": 420, "answer_type": "number",
       "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
      {"question_id": 421, "answer_type": "other",
       "answers": [{"answer": "red"}] * 2 + [{"answer": "blue"}] * 8}]})
  qs = load_vqav2(q, a, tmp_path / "coco")
  assert qs[0].image == str(tmp_path / "coco" / "COCO_val2014_000000000042.jpg")
  assert qs[0].prompt == "How many?" + SHORT and qs[0].answer == ["2"] * 10
  m = score_vqav2(qs, {"420": "Two", "421": "Red"})
  assert m["accuracy"] == pytest.approx((1.0 + 0.6) / 2)
  assert m["answer_type/number"] == 1.0 and m["answer_type/other"] == pytest.approx(0.6)

  _png(tmp_path / "tv" / "abc.jpg")
  tv = _json(tmp_path / "textvqa.json", {"data": [
      {"question_id": 7, "question": "What brand?", "image_id": "abc",
       "answers": ["Coca-Cola"] * 10}]})
  qs = load_textvqa(tv, tmp_path / "tv")
  assert qs[0].qid == "7" and qs[0].image == str(tmp_path / "tv" / "abc.jpg")
  assert score_textvqa(qs, {"7": "coca cola"})["accuracy"] == 1.0

  _png(tmp_path / "vw" / "VizWiz_val_00000000.jpg")
  vw = _json(tmp_path / "val.json", [
      {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "other",
       "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 3
                  + [{"answer": "soup", "answer_confidence": "maybe"}] * 7}])
  qs = load_vizwiz(vw, tmp_path / "vw")
  assert qs[0].qid == "VizWiz_val_00000000.jpg"
  assert qs[0].prompt == ("What is this?\nWhen the provided information is insufficient, "
                          "respond with 'Unanswerable'." + SHORT)
  assert score_vizwiz(qs, {qs[0].qid: "Unanswerable"})["accuracy"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------
# MMBench.

def _b64_png(color) -> tuple[str, np.ndarray]:
  img = Image.new("RGB", (5, 3), color)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode(), np.asarray(img)


def _mmbench_tsv(tmp_path, rows):
  cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
          "l2-category", "image"]
  path = tmp_path / "mmbench_dev.tsv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t")
    w.writerow(cols)
    for r in rows:
      w.writerow([r.get(c, "") for c in cols])
  return str(path)


def test_mmbench_circular(tmp_path):
  img, pixels = _b64_png((10, 200, 30))
  path = _mmbench_tsv(tmp_path, [
      {"index": "5", "question": "What is the color?", "hint": "A photo.", "A": "red",
       "B": "green", "C": "blue", "D": "nan", "answer": "B", "category": "color",
       "l2-category": "attribute", "image": img},
      {"index": "6", "question": "Which shape?", "A": "circle", "B": "square",
       "answer": "A", "category": "shape", "l2-category": "attribute", "image": "5"},
      {"index": "1000005", "question": "What is the color?", "A": "green", "B": "blue",
       "C": "red", "answer": "A", "category": "color", "image": img},  # A pre-rotated copy.
  ])
  qs = load_mmbench(path, tmp_path / "cache")
  assert [q.qid for q in qs] == ["5@0", "5@1", "5@2", "6@0", "6@1"]
  q = {q.qid: q for q in qs}
  assert q["5@0"].prompt == ("A photo.\nWhat is the color?\nA. red\nB. green\nC. blue" + CHOICE)
  assert q["5@1"].prompt == ("A photo.\nWhat is the color?\nA. green\nB. blue\nC. red" + CHOICE)
  assert q["5@2"].prompt == ("A photo.\nWhat is the color?\nA. blue\nB. red\nC. green" + CHOICE)
  assert [q[f"5@{s}"].answer for s in range(3)] == ["B", "A", "C"]
  assert q["6@0"].prompt == "Which shape?\nA. circle\nB. square" + CHOICE  # No hint.
  assert [q["6@0"].answer, q["6@1"].answer] == ["A", "B"]
  # The image is decoded to a file; row 6 points at row 5's image.
  assert q["5@0"].image == str(tmp_path / "cache" / "5.png")
  np.testing.assert_array_equal(np.asarray(Image.open(q["5@0"].image)), pixels)
  np.testing.assert_array_equal(np.asarray(Image.open(q["6@0"].image)), pixels)

  preds = {"5@0": "B", "5@1": "A.", "5@2": "A",       # The last rotation is wrong.
           "6@0": "circle", "6@1": "(B) circle"}      # Option text, then a letter.
  m = score_mmbench(qs, preds)
  assert m["circular_accuracy"] == 0.5 and m["accuracy"] == 0.5
  assert m["single_accuracy"] == 1.0
  assert m["category/color"] == 0.0 and m["category/shape"] == 1.0
  assert m["l2_category/attribute"] == 0.5 and m["n"] == 2

  single = load_mmbench(path, tmp_path / "cache", circular=False)
  assert [q.qid for q in single] == ["5@0", "6@0"]


@pytest.mark.parametrize("pred, want", [
    ("B", "B"), ("b", None), ("3", "B"), ("three.", "C"), ("THREE", "C"), ("C. three", "C"),
    ("(A) 3", "A"), ("5", None),
])
def test_mmbench_choice(pred, want):
  assert mmbench_choice(pred, ["1", "3", "three"]) == want


def test_mmbench_bad_answer_and_image(tmp_path):
  img, _ = _b64_png((1, 2, 3))
  path = _mmbench_tsv(tmp_path, [{"index": "1", "question": "Q?", "A": "x", "B": "y",
                                  "answer": "C", "image": img}])
  with pytest.raises(ValueError, match=r"record '1' answer 'C'"):
    load_mmbench(path, tmp_path / "cache")
  path = _mmbench_tsv(tmp_path, [{"index": "1", "question": "Q?", "A": "x", "B": "y",
                                  "answer": "A", "image": "not base64!"}])
  with pytest.raises(ValueError, match=r"record '1' field 'image' is not valid base64"):
    load_mmbench(path, tmp_path / "cache")


# ---------------------------------------------------------------------------
# Errors.

def test_missing_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"problems\.json.*not found: .*nope\.json"):
    load_scienceqa(tmp_path / "nope.json", tmp_path / "s.json", tmp_path)
  with pytest.raises(FileNotFoundError, match=r"GQA questions file .* not found: .*missing\.json"):
    load_gqa(tmp_path / "missing.json", tmp_path)
  with pytest.raises(FileNotFoundError, match="no POPE files matching"):
    load_pope(tmp_path, tmp_path)
  with pytest.raises(FileNotFoundError, match=r"MMBench TSV file .* not found: .*x\.tsv"):
    load_mmbench(tmp_path / "x.tsv", tmp_path / "cache")


def test_malformed_json_names_file_and_line(tmp_path):
  path = _write(tmp_path / "gqa.json", '{\n  "q1": {"question": "x",\n  oops}\n}')
  with pytest.raises(ValueError, match=r"gqa\.json: malformed JSON at line 3"):
    load_gqa(path, tmp_path)
  good = json.dumps({"question_id": 1, "image": "i.jpg", "text": "t", "label": "yes"})
  path = _write(tmp_path / "pope" / "x_pope_random.json", good + "\n" + good[:-3] + "\n")
  with pytest.raises(ValueError, match=r"x_pope_random\.json: malformed JSON at line 2"):
    load_pope(tmp_path / "pope", tmp_path)


def test_missing_field_names_record_and_field(tmp_path):
  _png(tmp_path / "i.jpg")
  path = _write(tmp_path / "p" / "coco_pope_random.json",
                json.dumps({"question_id": 9, "image": "i.jpg", "label": "yes"}) + "\n")
  with pytest.raises(ValueError, match=r"coco_pope_random\.json: record 9 has no field 'text'"):
    load_pope(path, tmp_path)
  path = _json(tmp_path / "g.json", {"q7": {"question": "x", "imageId": "i"}})
  with pytest.raises(ValueError, match=r"g\.json: record 'q7' has no field 'answer'"):
    load_gqa(path, tmp_path)
  p = _json(tmp_path / "problems.json", {"1": {"question": "q", "answer": 0, "image": "i.jpg"}})
  s = _json(tmp_path / "pid_splits.json", {"test": ["1"]})
  with pytest.raises(ValueError, match=r"problems\.json: record '1' has no field 'choices'"):
    load_scienceqa(p, s, tmp_path)
  q = _json(tmp_path / "q.json",
            {"questions": [{"question_id": 3, "question": "x", "image": "i.jpg"}]})
  a = _json(tmp_path / "a.json", {"annotations": [{"question_id": 3}]})
  with pytest.raises(ValueError, match=r"a\.json: record '3' has no field 'answers'"):
    load_vqav2(q, a, tmp_path)


def test_missing_image_names_question(tmp_path):
  path = _json(tmp_path / "g.json", {"q5": {"question": "x", "answer": "y", "imageId": "gone"}})
  with pytest.raises(FileNotFoundError, match=r"gqa question q5: image not found: .*gone\.jpg"):
    load_gqa(path, tmp_path)
  p, s, images = _scienceqa_files(tmp_path)
  os.remove(os.path.join(images, "test", "1", "image.png"))
  with pytest.raises(FileNotFoundError, match=r"scienceqa question 1: image not found"):
    load_scienceqa(p, s, images)


def test_scorers_reject_missing_and_unknown_predictions():
  qs = [Question(f"q{i}", None, "p", "yes", {"split": "random"}) for i in range(3)]
  with pytest.raises(ValueError, match=r"no prediction for 2 of 3 questions: 'q1', 'q2'"):
    score_pope(qs, {"q0": "yes"})
  with pytest.raises(ValueError, match=r"unknown question ids: 'zz'"):
    score_pope(qs, {"q0": "yes", "q1": "no", "q2": "no", "zz": "no"})
  with pytest.raises(ValueError, match="no reference answer"):
    score_gqa([Question("g", None, "p", None, {})], {"g": "x"})


def test_registry():
  assert set(registry.REGISTRY) == {"scienceqa", "pope", "mme", "gqa", "vqav2", "textvqa", "vizwiz",
                               "mmbench", "synthetic"}
  gqa = registry.REGISTRY["gqa"]
  assert gqa.load is load_gqa and gqa.score is score_gqa and gqa.headline == "accuracy"
  assert registry.builtin_names() == ("synthetic", "pope", "scienceqa", "vqav2", "gqa")
  # The config's benchmark blocks are the registry's: every path field starts unset.
  paths = config_lib.benchmark_paths()
  assert set(paths) == set(registry.REGISTRY) - {"synthetic"}
  assert dict(paths.vqav2) == {"questions": "", "annotations": "", "image_folder": ""}
  assert registry.get("mmbench").path_fields == ("tsv",) and paths.mmbench.circular


# ---------------------------------------------------------------------------
# The project's synthetic data, in the published formats.

def test_synthetic_benchmarks(tmp_path):
  info = synthetic.generate(str(tmp_path), n_caption=2, n_instruct=2, n_eval_per_type=4)
  d = str(tmp_path)

  pope = load_pope(os.path.join(d, "pope"), d)
  assert {q.meta["split"] for q in pope} == {"random", "popular", "adversarial"}
  m = score_pope(pope, {q.qid: q.answer for q in pope})
  assert m["f1"] == 1.0 and m["accuracy"] == 1.0
  m = score_pope(pope, {q.qid: "Yes" for q in pope})
  assert m["f1"] == pytest.approx(info["benchmark_chance"]["pope"]["f1_always_yes"])

  sqa = load_scienceqa(os.path.join(d, "scienceqa", "problems.json"),
                         os.path.join(d, "scienceqa", "pid_splits.json"), d)
  assert len(sqa) == 4
  m = score_scienceqa(sqa, {q.qid: q.answer for q in sqa})
  assert m["accuracy"] == 1.0 and m["unparsed"] == 0
  # The prompts are the human turns of LLaVA's question file, less "<image>\n".
  with open(os.path.join(d, "scienceqa", "llava_test.json")) as f:
    llava = {r["id"]: r["conversations"][0]["value"] for r in json.load(f)}
  assert {q.qid: "<image>\n" + q.prompt for q in sqa} == llava

  vqa = load_vqav2(os.path.join(d, "vqa", "questions.json"),
                     os.path.join(d, "vqa", "annotations.json"), d)
  assert len(vqa) == 4
  assert score_vqav2(vqa, {q.qid: q.meta["multiple_choice_answer"] for q in vqa})[
      "accuracy"] == 1.0

  gqa = load_gqa(os.path.join(d, "gqa", "testdev_balanced_questions.json"), d)
  assert len(gqa) == 4
  assert score_gqa(gqa, {q.qid: q.answer for q in gqa})["accuracy"] == 1.0
  syn = load_synthetic(os.path.join(d, "eval.json"), d)
  assert len(syn) == 4 * len(synthetic.IMAGE_TYPES)
  m = score_synthetic(syn, {q.qid: q.answer.capitalize() + "." for q in syn})
  assert m["accuracy"] == 1.0 and set(m) >= {f"type/{t}" for t in synthetic.IMAGE_TYPES}
  wrong = {q.qid: (q.answer if q.meta["type"] == "count" else "zzz") for q in syn}
  m = score_synthetic(syn, wrong)
  assert m["type/count"] == 1.0 and m["type/colour"] == 0.0
  assert m["accuracy"] == pytest.approx(1 / len(synthetic.IMAGE_TYPES))
  for q in pope + sqa + vqa + gqa + syn:
    assert os.path.isabs(q.image) and os.path.isfile(q.image)


# ---------------------------------------------------------------------------
# Baselines (chance and image-blind), in each benchmark's headline metric.

def test_question_prefix_is_the_question_form():
  assert question_prefix("Is there an apple in the image?") == "is there a"
  assert question_prefix("Is there a dog in the image?\nAnswer yes.") == "is there a"
  assert question_prefix("What color is the car?") == "what color is"
  assert question_prefix("How many?") == "how many"


def test_pope_baselines_by_hand(tmp_path):
  _pope_split(tmp_path, "random", ["yes", "yes", "yes", "yes", "no"])
  _pope_split(tmp_path, "popular", ["no", "no", "yes"])
  _pope_split(tmp_path, "adversarial", ["no", "yes"])  # A tie: "yes" is more frequent overall.
  qs = load_pope(str(tmp_path / "pope"), str(tmp_path / "img"))
  b = registry.baselines("pope", qs)
  assert set(b) == {"chance", "image_blind"}
  # chance: F1 of always "yes" per split (2p / (1 + p), p the yes rate), averaged.
  assert b["chance"] == pytest.approx((2 * .8 / 1.8 + 0.5 + 2 / 3) / 3)
  # image-blind: one form per split; random -> "yes", popular -> "no" (F1 0),
  # adversarial -> "yes" (the tie goes to the answer more frequent in all files).
  assert b["image_blind"] == pytest.approx((2 * .8 / 1.8 + 0.0 + 2 / 3) / 3)


def test_scienceqa_and_mmbench_baselines(tmp_path):
  p, s, images = _scienceqa_files(tmp_path)
  qs = load_scienceqa(p, s, images)
  b = registry.baselines("scienceqa", qs)
  assert b["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  assert b["image_blind"] == 1.0  # One question per form: its own answer is the majority.
  img, _ = _b64_png((10, 200, 30))
  path = _mmbench_tsv(tmp_path, [
      {"index": "5", "question": "What is the color?", "A": "red", "B": "green", "C": "blue",
       "answer": "B", "category": "c", "image": img},
      {"index": "6", "question": "Which shape?", "A": "circle", "B": "square",
       "answer": "A", "category": "s", "image": img}])
  mm = load_mmbench(path, tmp_path / "cache")
  b = registry.baselines("mmbench", mm)
  # Circular: every rotation right, (1/3)^3 and (1/2)^2.
  assert b["chance"] == pytest.approx(((1 / 3) ** 3 + (1 / 2) ** 2) / 2)
  assert b["image_blind"] == 0.0  # One letter for every rotation is never all right.
  single = load_mmbench(path, tmp_path / "cache", circular=False)
  assert registry.baselines("mmbench", single)["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_mme_baselines_by_hand(tmp_path):
  _mme_folder(tmp_path)
  b = registry.baselines("mme", load_mme(tmp_path))
  # Perception (existence, artwork): per subtask 50 (acc) + 100 x 0.5^2 (acc+).
  assert b["chance"] == pytest.approx(2 * (50 + 25))
  # Forms: "is it red" -> yes, "is it blue" -> no, "is there a" (cat yes, dog no: a tie
  # overall too) -> the first seen, yes: existence acc 75, acc+ 50. Artwork: "is this by"
  # and "is it a" are ties -> yes: acc 50, acc+ 0.
  assert b["image_blind"] == pytest.approx(125 + 50)


def test_vqa_and_gqa_baselines_by_hand():
  def q(qid, text, answers, qtype):
    return Question(qid, None, text + SHORT, answers,
                      {"question_type": qtype, "multiple_choice_answer": None})
  qs = [q("1", "What color is the car?", ["red"] * 10, "what color is the"),
        q("2", "What color is the bus?", ["blue"] * 8 + ["red"] * 2, "what color is the"),
        q("3", "What color is the van?", ["red"] * 9 + ["white"], "what color is the"),
        q("4", "How many dogs?", ["2"] * 10, "how many")]
  b = registry.baselines("vqav2", qs)
  assert b["chance"] == 0.0
  # "what color is the" -> "red" (2 of 3): 1.0, 0.6 (2 humans said red), 1.0; "how many": 1.
  assert b["image_blind"] == pytest.approx((1 + 0.6 + 1 + 1) / 4)
  gqa = [Question(f"g{i}", None, t + SHORT, a, {"detailed": d}) for i, (t, a, d) in
         enumerate([("What color is it?", "red", "color"), ("Which color?", "red", "color"),
                    ("What color is that?", "blue", "color"), ("Is it left?", "no", "place")])]
  b = registry.baselines("gqa", gqa)
  assert b == {"chance": 0.0, "image_blind": pytest.approx(3 / 4)}


def test_synthetic_baselines_reuse_chance_rates(tmp_path):
  info = synthetic.generate(str(tmp_path), n_caption=2, n_instruct=2, n_eval_per_type=5)
  syn = load_synthetic(os.path.join(str(tmp_path), "eval.json"), str(tmp_path))
  # The image-blind baseline comes from the questions; chance needs the generator's answer
  # sets, which the caller passes in.
  assert registry.baselines("synthetic", syn)["chance"] is None
  b = registry.baselines("synthetic", syn, chance=lambda qs: np.mean(
      [1 / synthetic.n_answers(q.meta) for q in qs]))
  # The same number of questions per type: the overall rates are the means over types.
  assert b["chance"] == pytest.approx(np.mean(list(info["chance_uniform"].values())))
  assert b["image_blind"] == pytest.approx(np.mean(list(info["chance"].values())))
  assert 0 < b["chance"] < b["image_blind"] < 1


def test_baselines_errors():
  with pytest.raises(ValueError, match=r"no baselines for benchmark 'coco'"):
    registry.baselines("coco", [])
  with pytest.raises(ValueError, match=r"gqa: no questions"):
    registry.baselines("gqa", [])
  with pytest.raises(ValueError, match=r"pope: 1 of 1 questions have no reference answer.*'x'"):
    registry.baselines("pope", [Question("x", None, "Is there a cat?", None, {"split": "r"})])
  assert set(registry.headlines()) == set(registry.REGISTRY)


# ---------------------------------------------------------------------------
# Broken question files: one error naming the file and the record.

def test_missing_images_name_the_question_file_and_record(tmp_path):
  _png(tmp_path / "img" / "ok.jpg")
  pope = _write(tmp_path / "pope" / "coco_pope_random.json", "\n".join(
      json.dumps({"question_id": i, "image": name, "text": "Is there a cat?", "label": "no"})
      for i, name in ((1, "ok.jpg"), (2, "gone.jpg"))) + "\n")
  with pytest.raises(FileNotFoundError) as e:
    load_pope(pope, tmp_path / "img")
  msg = str(e.value)
  assert msg.startswith(f"{pope}: pope question random/2 (record 2): image not found: ")
  assert msg.endswith("gone.jpg") and "\n" not in msg
  q = _json(tmp_path / "q.json", {"questions": [
      {"question_id": 1, "question": "x", "image": "ok.jpg"},
      {"question_id": 5, "question": "y", "image": "lost.jpg"}]})
  a = _json(tmp_path / "a.json", {"annotations": [{"question_id": i, "answers": ["z"]}
                                                  for i in (1, 5)]})
  with pytest.raises(FileNotFoundError, match=rf"^{q}: vqav2 question 5 \(question 1\): "
                     r"image not found: .*lost\.jpg$"):
    load_vqav2(q, a, tmp_path / "img")
  p, s, images = _scienceqa_files(tmp_path / "sqa")
  os.remove(os.path.join(images, "flat", "2.png"))
  with pytest.raises(FileNotFoundError, match=rf"^{p}: scienceqa question 2: image not found"):
    load_scienceqa(p, s, images)
  _mme_folder(tmp_path / "mme")
  os.remove(tmp_path / "mme" / "artwork" / "images" / "d.png")
  with pytest.raises(FileNotFoundError, match=r"questions_answers_YN/d\.txt: mme question "
                     r"artwork/d/0: image not found"):
    load_mme(tmp_path / "mme")


def test_broken_records_name_file_and_record(tmp_path):
  _png(tmp_path / "i.jpg")
  good = {"question_id": 1, "image": "i.jpg", "text": "t", "label": "yes"}
  path = _json(tmp_path / "pope" / "x_pope_random.json",
               [good, {**good, "question_id": 2, "label": "maybe"}])
  with pytest.raises(ValueError, match=r"x_pope_random\.json: record 2 label 'maybe' is not "
                     r"yes/no"):
    load_pope(path, tmp_path)
  path = _write(tmp_path / "q2.json", json.dumps({"questions": [{"question": "x"}]}))
  with pytest.raises(ValueError, match=r"q2\.json: record 'question 0' has no field "
                     r"'question_id'"):
    load_vqav2(path, None, tmp_path)
  path = _write(tmp_path / "problems.json", '{"1": {"question": "q",, }}')
  with pytest.raises(ValueError, match=r"problems\.json: malformed JSON at line 1"):
    load_scienceqa(path, path, tmp_path)


# ---------------------------------------------------------------------------
# The results table.

def test_table_reproduces_the_trainers_table():
  """Label column, integer / 2-decimal / 3-decimal columns, blank cells, a long label."""
  ms = [1, 16]
  acc = {"colour": {1: 0.5, 16: 0.875}, "count_something_long": {1: 0.25, 16: 1.0}}
  count, chance, loss = {"colour": 120, "count_something_long": 7}, {"colour": 1 / 6}, \
      {1: 1.2345, 16: 0.5}
  from mqt import train_eval  # pylint: disable=import-outside-toplevel
  got = train_eval.format_table({"accuracy": acc, "count": count, "loss": loss}, ms, chance)
  assert got.split("\n") == [
      "question type     n  chance     m=1    m=16",
      "-------------------------------------------",
      "colour          120    0.17   0.500   0.875",
      "count_something_long    7           0.250   1.000",
      "loss                          1.234   0.500"]


def test_table_row_formats_text_cells_and_notes():
  cols = [Column("m=2", 10), Column("m=4", 10)]
  rows = [Row("pope f1", [0.5, 0.75]), Row("  baselines", note="  chance 0.667"),
          Row("GFLOPs", [1234.5, 0.01234], fmt=".4g"), Row("tok/s", ["n/a", "1,234"])]
  assert format_table(cols, rows, label=("", 12), rule="").split("\n") == [
      "                   m=2       m=4",
      "pope f1          0.500     0.750",
      "  baselines   chance 0.667",
      "GFLOPs            1234   0.01234",
      "tok/s              n/a     1,234"]
