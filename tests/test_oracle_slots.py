"""bench/oracle_slots.py: the image placeholder becomes the scene's 9 cells, answers intact."""
import numpy as np
import pytest

from bench import oracle_slots
from data import synthetic as S
from data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.Tokenizer.load(tokenizer_lib.train_tokenizer(
      S.corpus_text(0, 200), str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=512))


def test_slots_hold_each_cell_and_the_answers_stay_labelled(tok):
  n = 12
  for system_prompt in (True, False):
    ids, labels, slots, names = oracle_slots.encode(tok, 0, "eval", n, (), system_prompt)
    assert ids.shape == labels.shape == slots.shape[:2] and len(names) == n
    for r in range(n):
      rec, scene = S.sample(0, "eval", r)
      assert names[r].split("/")[0] == rec["type"]
      where = np.flatnonzero(slots[r, :, 0] >= 0)
      assert len(where) == oracle_slots.CELLS and np.all(np.diff(where) == 1)
      cells = slots[r, where]
      assert list(cells[:, 0]) == list(range(9))
      for o in scene.objects:
        assert tuple(cells[o.row * 3 + o.col, 1:]) == (
            1 + S.SHAPES.index(o.shape), 1 + S.COLORS.index(o.color), 1 + S.SIZES.index(o.size))
      assert (cells[:, 1] > 0).sum() == len(scene.objects)
      assert np.all(ids[r, where] == 0) and np.all(labels[r, where] == oracle_slots.IGNORE)
      answer = [t for t in labels[r] if t != oracle_slots.IGNORE]
      assert tok.decode(answer).strip() == rec["answer"]
      text = tok.decode([t for t in ids[r] if t > 0])
      assert (S.VICUNA_SYSTEM in text) == system_prompt and "USER:" in text


def test_latent_mode_points_each_slot_at_its_latent_and_sample(tok):
  ids, labels, slots, _ = oracle_slots.encode(tok, 0, "eval", 6, (), True, latent_slots=16)
  for r in range(6):
    where = np.flatnonzero(slots[r, :, 0] >= 0)
    assert len(where) == 16 and np.all(np.diff(where) == 1)
    assert list(slots[r, where, 0]) == list(range(16)) and np.all(slots[r, where, 1] == r)
    assert np.all(labels[r, where] == oracle_slots.IGNORE)


def test_qa_split_rounds_gives_one_question_per_sample_with_the_slots_after_it(tok):
  """--template=qa --split_rounds: the layout of configs/tiny.py's stage 2."""
  n = 10
  ids, labels, slots, names = oracle_slots.encode(tok, 0, "instruct", n, (), True,
                                                  template="qa", split_rounds=True)
  rounds = []
  for i in range(n):
    rec, scene = S.sample(0, "instruct", i)
    conv = rec["conversations"]
    kinds = rec["types"] if rec["type"] == "multi" else [rec["type"]]
    rounds += [(conv[2 * k]["value"], conv[2 * k + 1]["value"], kinds[k], scene)
               for k in range(len(conv) // 2)]
  assert len(names) == len(rounds) > n  # Some records hold several questions.
  for r, (question, answer, kind, scene) in enumerate(rounds):
    assert names[r].split("/")[0] == kind
    answer_ids = [t for t in labels[r] if t != oracle_slots.IGNORE]
    assert tok.decode(answer_ids).strip() == answer
    where = np.flatnonzero(slots[r, :, 0] >= 0)
    if scene is None:
      assert len(where) == 0
      continue
    assert len(where) == oracle_slots.CELLS and np.all(np.diff(where) == 1)
    before = tok.decode([t for t in ids[r, :where[0]] if t > 0])
    after = tok.decode([t for t in ids[r, where[-1] + 1:] if t > 0])
    assert before.strip() == "USER: " + question.replace("<image>", "").strip()
    assert after.startswith("ASSISTANT:") and after.strip().endswith(answer)
  kinds = oracle_slots.encode(tok, 0, "instruct", n, ("colour",), True, template="qa",
                              split_rounds=True)[3]
  assert kinds and all(k.startswith("colour/") for k in kinds)
