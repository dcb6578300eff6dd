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

Modules: scenes (drawing and rendering a scene), questions (question types,
answers, chance rates), samples (the records of each split), writers
(`generate`, the files and the command line). This package re-exports their
public names, so `from data import synthetic` serves them all.
"""
from data.synthetic.questions import (CHOICE_SUFFIX, IMAGE_TYPES, LETTERS, NEG_KINDS,
                                      POPULAR_TOP, SHORT_SUFFIX, chance_rates, n_answers,
                                      negatives, prior_key)
from data.synthetic.samples import (CAPTION_REQUESTS, SHUFFLE_CAPTIONS, SPLIT_KINDS,
                                    TEXT_FRACTION, TURN_CHAR_BUDGET, TURN_WEIGHTS, VICUNA_SYSTEM,
                                    caption_sample, corpus_text, instruct_sample, iter_records,
                                    make_scene, sample)
from data.synthetic.scenes import (ALL_POSITIONS, COLOR_RGB, COLOR_WEIGHTS, COLORS, COLS,
                                   COMBO_RANK, COMBOS, GRID, JITTER, MAX_OBJECTS, OUTLINE,
                                   OUTLINE_RGB, POSITION_NAMES, RADIUS, ROWS, SHAPE_PLURALS,
                                   SHAPE_WEIGHTS, SHAPES, SIZES, SPLIT_IDS, Obj, Scene, caption,
                                   png_bytes, render, split_id)
from data.synthetic.writers import HELDOUT_SPLITS, TRAIN_SPLITS, generate, main

# Bumped whenever the generator's output changes: a data_dir prepared by another
# version is refused (data.prepare.check_settings) instead of silently reused.
# 2: 1-4 questions per image, centred objects; 3: outlines, caption order; 4: whole-image
# questions (any, most).
DATA_VERSION = 4

__all__ = ["ALL_POSITIONS", "CAPTION_REQUESTS", "CHOICE_SUFFIX", "COLORS", "COLOR_RGB",
           "COLOR_WEIGHTS", "COLS", "COMBOS", "COMBO_RANK", "DATA_VERSION", "GRID",
           "HELDOUT_SPLITS", "IMAGE_TYPES", "JITTER", "LETTERS", "MAX_OBJECTS", "NEG_KINDS",
           "OUTLINE", "OUTLINE_RGB", "POPULAR_TOP", "POSITION_NAMES", "RADIUS", "ROWS", "SHAPES",
           "SHAPE_PLURALS", "SHAPE_WEIGHTS", "SHORT_SUFFIX", "SHUFFLE_CAPTIONS", "SIZES",
           "SPLIT_IDS", "SPLIT_KINDS", "TEXT_FRACTION", "TRAIN_SPLITS", "TURN_CHAR_BUDGET",
           "TURN_WEIGHTS", "VICUNA_SYSTEM", "Obj", "Scene", "caption", "caption_sample",
           "chance_rates", "corpus_text", "generate", "instruct_sample", "iter_records", "main",
           "make_scene", "n_answers", "negatives", "png_bytes", "prior_key", "render", "sample",
           "split_id"]
