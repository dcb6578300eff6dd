"""Templates and tokenizer: exact ids and label masks against independent references.

`OfficialLlava` re-states the official LLaVA preprocessing on top of a given
text -> ids function: the prompt string is built, split at `<image>`, each
chunk tokenized, and the labels derived by LLaVA's round-length arithmetic
(split at "</s>", instruction_len = len(tokens(parts[0])) - 2, and for
non-legacy tokenizers one token less per round after the first). Two text ->
ids functions feed it: `slow_llama`, HF's slow `LlamaTokenizer` (what LLaVA
uses) re-stated on raw SentencePiece, and the HF `LlamaTokenizer` of the
installed transformers, built from the same `tokenizer.model`.
"""
import json
import re
import shutil

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data import templates
from data import tokenizer as tokenizer_lib
from data.templates import IGNORE_INDEX, IMAGE_TOKEN_ID, ConversationError

CORPUS = [
    templates.SYSTEM, "USER: What is shown? ASSISTANT: A red circle and a blue square.",
    "Describe the scene in detail.", "How many objects are there? Two.",
    "Naïve café résumé — déjà vu.", "Line one\nLine two\n\nLine four",
    "The answer is 42, not 7 or 1234.", "Is there a dog? No, there is not.",
] * 30
SPECIAL_RE = re.compile("(<s>|</s>|<unk>)")
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  return tokenizer_lib.train_tokenizer(CORPUS, path, vocab_size=400)


def load(path, legacy):
  return tokenizer_lib.Tokenizer.load(path, legacy=legacy)


def slow_llama(path, legacy):
  """`LlamaTokenizer(legacy=...)(text).input_ids` of transformers 4.x, on raw SentencePiece."""
  proto = open(path, "rb").read()
  with_prefix = spm.SentencePieceProcessor(model_proto=proto)
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  m.normalizer_spec.add_dummy_prefix = False
  without = spm.SentencePieceProcessor(model_proto=m.SerializeToString())

  def tokenize(text):
    out = [1]
    for i, part in enumerate(SPECIAL_RE.split(text)):
      if i % 2:
        out.append(SPECIAL_IDS[part])
      elif part:
        out += (with_prefix if i == 0 or legacy else without).encode(part)
    return out
  return tokenize


def hf_comparable(texts):
  """False where the installed transformers is known to differ from the slow tokenizer.

  transformers 5 has no SentencePiece-based LlamaTokenizer; its tokenizers-based
  one (Metaspace pre-tokenizer) adds no dummy "▁" to a segment that already
  starts with a space, where SentencePiece (and transformers 4's slow and fast
  LLaMA tokenizers) add one: " 4" -> "▁▁4" there, "▁4" here. That hits the
  first segment, and with legacy=True every segment after a special token.
  LLaVA's prompts have no such segment unless a turn holds "<s> ", "<unk> ", or
  a first question is "<image>" alone (the chunk after the image is then
  " ASSISTANT: ..."). `texts` may be turn values or rendered prompts.
  """
  return not any(re.search(r"(<s>|</s>|<unk>)\s|<image> ASSISTANT", t) or t.strip() == "<image>"
                 for t in texts)


def hf_llama(path, legacy, tmp_path):
  """The installed transformers' LlamaTokenizer on the same model file, BOS first."""
  transformers = pytest.importorskip("transformers")
  shutil.copy(path, tmp_path / "tokenizer.model")
  hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=legacy)
  return lambda text: [hf.bos_token_id] + hf(text, add_special_tokens=False).input_ids


class OfficialLlava:
  """LLaVA's tokenizer_image_token, preprocess_v1 and preprocess_plain, re-stated."""

  def __init__(self, tokenize, legacy):
    self.tokenize, self.legacy = tokenize, legacy

  def image_tokens(self, prompt):
    chunks = [self.tokenize(c) for c in prompt.split("<image>")]
    ids = list(chunks[0])
    for c in chunks[1:]:
      ids += [IMAGE_TOKEN_ID] + c[1:]
    return ids

  def vicuna(self, conversations, has_image):
    conv = [dict(t) for t in conversations]
    if has_image:  # preprocess_multimodal: the text stripped, then the whole stripped.
      conv[0]["value"] = ("<image>\n" + conv[0]["value"].replace("<image>", "").strip()).strip()
    prompt = templates.SYSTEM + " "
    for t in conv:
      human = t["from"] == "human"
      prompt += ("USER" if human else "ASSISTANT") + ": " + t["value"] + (" " if human else "</s>")
    tok = self.image_tokens if has_image else self.tokenize
    ids = tok(prompt)
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split("</s>")):
      if not rou:
        break
      parts = rou.split(" ASSISTANT: ")
      assert len(parts) == 2
      parts[0] += " ASSISTANT: "
      round_len, instruction_len = len(tok(rou)), len(tok(parts[0])) - 2
      if i and not self.legacy:
        round_len, instruction_len = round_len - 1, instruction_len - 1
      target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
      cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "the reference mismatched (LLaVA would mask the sample)"
    return ids, target

  def plain(self, conversations):
    ids = self.image_tokens("<image>" + conversations[1]["value"] + "\n")
    return ids, [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]


def H(v):
  return {"from": "human", "value": v}


def G(v):
  return {"from": "gpt", "value": v}


CONVERSATIONS = {
    "single, image first": ([H("<image>\nWhat is shown?"), G("A red circle.")], True),
    "image after question": ([H("What is shown?\n<image>"), G("A blue square.")], True),
    "image mid-text, spaces": ([H("  What is <image> shown? "), G("Two.  ")], True),
    "multi-turn": ([H("<image>\nHow many objects?"), G("Two."), H("Is there a dog?"),
                    G("No, there is not."), H("Describe it."), G("A red circle and a square.")],
                   True),
    "text-only multi-turn": ([H("The answer is 42?"), G("Not 7."), H("And 1234?"), G("Yes.")],
                             False),
    "unicode and byte fallback": ([H("<image>\nNaïve café? 日本語 🙂"), G("Déjà vu — résumé ✓.")],
                                  True),
    "answer starts with byte fallback": ([H("<image>\nFace?"), G("🙂 yes"), H("Again?"),
                                          G("日本語")], True),
    "newlines in answers": ([H("<image>\nList lines."), G("Line one\nLine two\n\nLine four\n")],
                            True),
    "special texts inside turns": ([H("<image>\nIs <s> a tag?"), G("Yes, <s> and <unk> are."),
                                    H("<unk>?"), G("<s>")], True),
    "image alone": ([H("<image>"), G("A red circle."), H("  Colour? \n"), G("Red.")], True),
    "spaces around image and text": ([H(" \n <image>\n  What is shown?\n "), G("Two."),
                                      H("\n How many? "), G(" 2 ")], True),
    "text-only, spaces kept": ([H("  The answer is 42? \n"), G("Not 7."), H(" And? "), G("Yes.")],
                               False),
}


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_vicuna_v1_matches_official(model_path, legacy, name):
  conv, has_image = CONVERSATIONS[name]
  tok = load(model_path, legacy)
  ids, labels = templates.encode_conversation(conv, tok, "vicuna_v1", has_image, "s1")
  want_ids, want_labels = OfficialLlava(slow_llama(model_path, legacy), legacy).vicuna(
      conv, has_image)
  assert ids == want_ids
  assert labels == want_labels
  assert ids.count(IMAGE_TOKEN_ID) == int(has_image)
  assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX
  # Labels are exactly the answers, each with its </s>.
  answers = [t["value"] for t in conv if t["from"] == "gpt"]
  spans = "".join("X" if l != IGNORE_INDEX else "." for l in labels).split(".")
  spans = [s for s in spans if s]
  assert len(spans) == len(answers)
  got = [i for i in labels if i != IGNORE_INDEX]
  assert got.count(tok.eos_id) == len(answers)
  assert all(labels[i] == ids[i] for i in range(len(ids)) if labels[i] != IGNORE_INDEX)


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_v1_matches_installed_hf_tokenizer(model_path, legacy, tmp_path):
  official = OfficialLlava(hf_llama(model_path, legacy, tmp_path), legacy)
  tok = load(model_path, legacy)
  for name, (conv, has_image) in sorted(CONVERSATIONS.items()):
    if not hf_comparable(t["value"] for t in conv):
      continue
    got = templates.encode_conversation(conv, tok, "vicuna_v1", has_image, name)
    assert got == official.vicuna(conv, has_image), name


@pytest.mark.parametrize("legacy", [True, False])
def test_plain_matches_official(model_path, legacy, tmp_path):
  tok = load(model_path, legacy)
  for caption in ["A red circle at the top left.", "日本語 🙂\nline two", "Two <s> tags."]:
    conv = [H("<image>"), G(caption)]
    ids, labels = templates.encode_conversation(conv, tok, "plain", True)
    references = [slow_llama(model_path, legacy)]
    if hf_comparable([caption]):
      references.append(hf_llama(model_path, legacy, tmp_path))
    for tokenize in references:
      assert (ids, labels) == OfficialLlava(tokenize, legacy).plain(conv)
    assert tok.eos_id not in ids and ids[:2] == [tok.bos_id, IMAGE_TOKEN_ID]
    if "<s>" not in caption:  # (Legacy: "<s> tags" -> "<s>", "▁▁tags", an extra space.)
      assert tok.decode([i for i in labels if i >= 0]) == caption + "\n"


def test_hand_checked_ids(model_path):
  """A few values asserted by hand, independent of any reference."""
  tok = load(model_path, True)
  piece = tok.id_to_piece
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
  assert tok.encode("x</s>y", bos=True)[:2] == [1, tok.encode("x")[0]]
  non_legacy = load(model_path, False)
  pieces = lambda t, text, **kw: [piece(i) for i in t.encode(text, **kw)]
  assert pieces(tok, "The</s>The") == ["▁The", "</s>", "▁The"]
  assert pieces(non_legacy, "The</s>The") == ["▁The", "</s>", "T", "he"]
  assert pieces(tok, "<s>The<unk>The") == ["<s>", "▁The", "<unk>", "▁The"]
  assert pieces(non_legacy, "<s>The<unk>The") == ["<s>", "T", "he", "<unk>", "T", "he"]
  assert pieces(tok, "The", dummy_prefix=False) == ["T", "he"]
  # SentencePiece's dummy prefix goes in front of a leading space: a second "▁".
  assert pieces(tok, "</s> 4") == ["</s>", "▁", "▁", "4"]
  assert pieces(non_legacy, "</s> 4") == ["</s>", "▁", "4"]


def test_legacy_matters_after_the_first_round(model_path):
  conv = CONVERSATIONS["multi-turn"][0]
  a, la = templates.encode_conversation(conv, load(model_path, True), "vicuna_v1", True)
  b, lb = templates.encode_conversation(conv, load(model_path, False), "vicuna_v1", True)
  assert len(a) == len(b) + 2  # One "▁" less after each of the two inner </s>.
  assert [x for x in la if x >= 0] == [x for x in lb if x >= 0]


def test_image_chunk_starts_with_prefix_then_newline(model_path):
  tok = load(model_path, True)
  ids, _ = templates.encode_conversation(CONVERSATIONS["single, image first"][0], tok,
                                         "vicuna_v1", True)
  after = ids[ids.index(IMAGE_TOKEN_ID) + 1:]
  # LLaMA: 29871 ("▁"), 13 ("<0x0A>"); this corpus has "\n" as a piece of its own.
  assert [tok.id_to_piece(i) for i in after[:2]] in (["▁", "<0x0A>"], ["▁", "\n"])
  assert ids.count(tok.bos_id) == 1


def test_legacy_is_read_from_tokenizer_config(model_path, tmp_path):
  path = tmp_path / "tokenizer.model"
  shutil.copy(model_path, path)
  assert tokenizer_lib.Tokenizer.load(str(path)).legacy
  for value, want in ((False, False), (True, True), (None, True)):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": value}))
    assert tokenizer_lib.Tokenizer.load(str(path)).legacy is want
  assert tokenizer_lib.Tokenizer.load(str(path), legacy=True).legacy
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "missing.model"))


def test_byte_fallback_round_trips(model_path):
  tok = load(model_path, True)
  text = "日本語 🙂 ok\nnaïve"
  ids = tok.encode(text)
  assert tok.unk_id not in ids and tok.decode(ids) == text
  assert "<0xE6>" in [tok.id_to_piece(i) for i in ids]
  assert tok.decode([tok.bos_id] + ids + [IMAGE_TOKEN_ID, IGNORE_INDEX]) == text


def test_training_is_deterministic(model_path, tmp_path):
  again = tokenizer_lib.train_tokenizer(CORPUS, str(tmp_path / "again.model"), vocab_size=400)
  assert open(again, "rb").read() == open(model_path, "rb").read()  # Path-independent too.
  assert load(again, True).vocab_size == 400


def test_generation_prompt_is_the_training_prefix(model_path):
  for legacy in (True, False):
    tok = load(model_path, legacy)
    for question in ("What is shown?", "What is shown?\n<image>"):
      conv = [H(question if "<image>" in question else "<image>\n" + question), G("A red circle.")]
      ids, labels = templates.encode_conversation(conv, tok, "vicuna_v1", True)
      prompt = templates.prompt_for_generation(question, tok, "vicuna_v1", True)
      first_label = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
      assert ids[:first_label] == prompt
      assert tok.decode(prompt).endswith("What is shown? ASSISTANT:")
  text_only = templates.prompt_for_generation("Hi?", tok, "vicuna_v1", False)
  assert IMAGE_TOKEN_ID not in text_only
  assert templates.prompt_for_generation("q", tok, "plain", True) == [1, IMAGE_TOKEN_ID]


ERRORS = {
    "empty conversation": ([], True, "vicuna_v1"),
    "turn 0 is from 'gpt', expected 'human'": ([G("hi"), H("<image>\nq")], True, "vicuna_v1"),
    "turns must alternate": ([H("<image>\nq"), G("a"), G("b"), H("c")], True, "vicuna_v1"),
    "ends on a human turn": ([H("<image>\nq"), G("a"), H("more?")], True, "vicuna_v1"),
    "no <image> in its first human turn$": ([H("q"), G("a")], True, "vicuna_v1"),
    "no <image> in its first human turn \\(found in turn 2\\)":
        ([H("q"), G("a"), H("<image>"), G("b")], True, "vicuna_v1"),
    "<image> appears 2 times": ([H("<image>\n<image> q"), G("a")], True, "vicuna_v1"),
    "<image> outside the first human turn \\(turn 1\\)":
        ([H("<image>\nq"), G("a <image>")], True, "vicuna_v1"),
    "text-only sample \\(no image\\) has <image> in turn 0": ([H("<image>\nq"), G("a")], False,
                                                            "plain"),
    "turn 1 is empty": ([H("<image>\nq"), G("")], True, "vicuna_v1"),
    "turn 1 contains the literal text '</s>'": ([H("<image>\nq"), G("a</s>b")], True,
                                                "vicuna_v1"),
    "unknown template 'chatml'": ([H("q"), G("a")], False, "chatml"),
    "the plain template needs an image": ([H("q"), G("a")], False, "plain"),
    "one human and one gpt turn, got 4": ([H("<image>"), G("a"), H("q"), G("b")], True, "plain"),
}


@pytest.mark.parametrize("message", sorted(ERRORS))
def test_bad_conversations_name_the_sample(model_path, message):
  conv, has_image, template = ERRORS[message]
  tok = load(model_path, True)
  with pytest.raises(ConversationError, match=f"^sample sample-42: .*{message}"):
    templates.encode_conversation(conv, tok, template, has_image, sample_id="sample-42")
  assert issubclass(ConversationError, ValueError)


class _OffByOneTokenizer(tokenizer_lib.Tokenizer):
  """Continuation text tokenizes differently from the whole chunk (one extra unk)."""

  def encode(self, text, bos=False, dummy_prefix=True):
    ids = super().encode(text, bos, dummy_prefix)
    return ids if dummy_prefix else ids + [self.unk_id]


def test_inconsistent_tokenization_is_loud(model_path):
  tok = _OffByOneTokenizer(open(model_path, "rb").read())
  with pytest.raises(ConversationError, match="^sample s7: the vicuna_v1 template does not "
                     "tokenize consistently"):
    templates.encode_conversation(CONVERSATIONS["multi-turn"][0], tok, "vicuna_v1", True, "s7")


@pytest.mark.parametrize("legacy", [True, False])
def test_qa_puts_the_image_after_the_question_without_system_prompt(model_path, legacy):
  tok = load(model_path, legacy)
  conv = [{"from": "human", "value": "<image>\nWhat is shown?"},
          {"from": "gpt", "value": "A red circle."},
          {"from": "human", "value": "How many objects are there?"},
          {"from": "gpt", "value": "Two."}]
  ids, labels = templates.encode_conversation(conv, tok, "qa", has_image=True)
  k = ids.index(IMAGE_TOKEN_ID)
  # BOS, the first question, the image, then " ASSISTANT:" as its own chunk.
  assert ids[:k] == tok.encode("USER: What is shown?", bos=True)
  first_answer = tok.encode(" A red circle.</s>", dummy_prefix=False)
  after = tok.encode("ASSISTANT:")
  assert ids[k + 1:k + 1 + len(after)] == after
  assert ids[k + 1 + len(after):k + 1 + len(after) + len(first_answer)] == first_answer
  # Loss exactly on each answer and its </s>; the same text as whole-chunk tokenization.
  kept = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
  assert kept == first_answer + tok.encode(" Two.</s>", dummy_prefix=False)
  assert [l for l in labels if l != IGNORE_INDEX] == kept
  assert templates.SYSTEM not in tok.decode([i for i in ids if i >= 0])
  # A generation prompt is the same ids as the conversation up to the first answer.
  prompt = templates.prompt_for_generation("<image>\nWhat is shown?", tok, "qa")
  assert prompt == ids[:k + 1 + len(after)]


def test_qa_without_image_and_bad_conversations(model_path):
  tok = load(model_path, True)
  conv = [{"from": "human", "value": "How many digits?"}, {"from": "gpt", "value": "One."}]
  ids, _ = templates.encode_conversation(conv, tok, "qa", has_image=False)
  assert IMAGE_TOKEN_ID not in ids
  assert ids == tok.encode("USER: How many digits? ASSISTANT: One.</s>", bos=True)
  with pytest.raises(ConversationError, match="sample s7"):
    templates.encode_conversation(conv[:1], tok, "qa", has_image=False, sample_id="s7")


def test_one_round_moves_the_image_into_the_asked_question():
  conv = [{"from": "human", "value": "What colour?\n<image>"}, {"from": "gpt", "value": "red"},
          {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]
  assert templates.one_round(conv, 1, True) == [
      {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2"}]
  assert templates.one_round(conv, 0, True)[0]["value"] == "<image>\nWhat colour?"
  assert templates.one_round(conv, 1, False)[0]["value"] == "How many?"
  assert conv[2]["value"] == "How many?"  # The input is left as it was.


def _reference_ids(tokenize, legacy, text):
  """`text` tokenised whole the official way (split at `<image>`, BOS once)."""
  return OfficialLlava(tokenize, legacy).image_tokens(text) if "<image>" in text else tokenize(text)


S = templates.SYSTEM
# (template, history, question, has_image, the prompt string LLaVA would build).
PROMPTS = {
    "vicuna, image in the first question, two rounds": (
        "vicuna_v1", [("<image>\nWhat is shown?", "A red circle."), ("How many objects?", "Two.")],
        "Is there a dog?", True,
        S + " USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>USER: How many objects? "
        "ASSISTANT: Two.</s>USER: Is there a dog? ASSISTANT:"),
    "vicuna, image added, texts verbatim": (
        "vicuna_v1", [("  What is shown? ", "A red circle.")], " And now?\n", True,
        S + " USER: <image>\n  What is shown?  ASSISTANT: A red circle.</s>USER:  And now?\n "
        "ASSISTANT:"),
    "vicuna, <image> in a spaced question is stripped": (
        "vicuna_v1", [(" \n<image>\n  What?  \n", "Red.")], "  More? ", True,
        S + " USER: <image>\nWhat? ASSISTANT: Red.</s>USER:   More?  ASSISTANT:"),
    "vicuna, one question, image added verbatim": (
        "vicuna_v1", [], "  What is shown?\n ", True,
        S + " USER: <image>\n  What is shown?\n  ASSISTANT:"),
    "vicuna, one question with <image> mid-text": (
        "vicuna_v1", [], " What is <image> shown? \n", True,
        S + " USER: <image>\nWhat is  shown? ASSISTANT:"),
    "vicuna, <image> alone": ("vicuna_v1", [], "\n<image>\n", True,
                              S + " USER: <image> ASSISTANT:"),
    "vicuna, text-only, spaces kept": (
        "vicuna_v1", [("  Hi? ", "Hello.")], "Bye?\n", False,
        S + " USER:   Hi?  ASSISTANT: Hello.</s>USER: Bye?\n ASSISTANT:"),
    "qa, image after the first question": (
        "qa", [("What is shown?\n<image>", "A red circle.")], "How many?", True,
        "USER: What is shown?<image>ASSISTANT: A red circle.</s>USER: How many? ASSISTANT:"),
    "qa, image added, question verbatim": (
        "qa", [], "  What?  ", True, "USER:   What?  <image>ASSISTANT:"),
    "qa, text-only": ("qa", [("How many digits?", "One.")], "Why?", False,
                      "USER: How many digits? ASSISTANT: One.</s>USER: Why? ASSISTANT:"),
}


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prompt_for_conversation_is_the_llava_prompt(model_path, legacy, name, tmp_path):
  template, history, question, has_image, text = PROMPTS[name]
  tok = load(model_path, legacy)
  got = templates.prompt_for_conversation(history, question, tok, template, has_image)
  references = [slow_llama(model_path, legacy)]
  if hf_comparable([text]):
    references.append(hf_llama(model_path, legacy, tmp_path))
  for tokenize in references:
    assert got == _reference_ids(tokenize, legacy, text)
  assert got.count(IMAGE_TOKEN_ID) == int(has_image) and got.count(tok.bos_id) == 1
  assert got.count(tok.eos_id) == len(history)
  assert tok.decode(got).endswith(" ASSISTANT:")
  if not history:
    assert templates.prompt_for_generation(question, tok, template, has_image) == got


def test_hf_compared_prompts_are_most_of_them():
  assert sum(hf_comparable([p[-1]]) for p in PROMPTS.values()) == len(PROMPTS) - 1


def _last_answer_start(labels):
  """Index of the first label of the last answer span."""
  return max(i for i in range(1, len(labels))
             if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("template", ["vicuna_v1", "qa"])
def test_conversation_prompt_is_the_training_prefix(model_path, legacy, template):
  tok = load(model_path, legacy)
  for name, (conv, has_image) in sorted(CONVERSATIONS.items()):
    ids, labels = templates.encode_conversation(conv, tok, template, has_image, name)
    history = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 2, 2)]
    prompt = templates.prompt_for_conversation(history, conv[-2]["value"], tok, template,
                                               has_image)
    start = _last_answer_start(labels)
    assert prompt == ids[:start], name
    assert ids[start:] == tok.encode(" " + conv[-1]["value"] + "</s>", dummy_prefix=False), name


def test_training_strips_only_the_first_question_with_an_image(model_path):
  tok = load(model_path, False)
  tokenize = slow_llama(model_path, False)
  conv = [H(" \n<image>\n  What?  \n"), G("Red."), H("  More? "), G(" Two ")]
  ids, _ = templates.encode_conversation(conv, tok, "vicuna_v1", True)
  assert ids == _reference_ids(tokenize, False, S + " USER: <image>\nWhat? ASSISTANT: Red.</s>"
                               "USER:   More?  ASSISTANT:  Two </s>")
  conv = [H("  What?  \n"), G("Red.")]
  ids, _ = templates.encode_conversation(conv, tok, "vicuna_v1", False)
  assert ids == tokenize(S + " USER:   What?  \n ASSISTANT: Red.</s>")
  assert templates.image_first("\n<image>\n") == "<image>"
  assert templates.image_first(" a <image> b ") == "<image>\na  b"


PROMPT_ERRORS = {
    "^the plain template needs an image": ([], "q", "plain", False),
    "^the plain template has one round; got a history of 1": ([("<image>", "a")], "q", "plain",
                                                               True),
    r"^history\[0\] is 'q a'; expected a \(question, answer\) pair of strings": (["q a"], "q",
                                                                                "vicuna_v1", True),
    r"^history\[1\] is \('q2',\); expected": ([("q", "a"), ("q2",)], "q", "vicuna_v1", True),
    r"^history must be a list of \(question, answer\) pairs, got str": ("q", "q", "qa", True),
    r"^<image> outside the first question \(history\[0\] answer\)": ([("q", "a <image>")], "q2",
                                                                      "vicuna_v1", True),
    r"^<image> outside the first question \(the question\)": ([("q", "a")], "<image> q2", "qa",
                                                               True),
    r"^a prompt without image has <image> in history\[0\] question": ([("<image> q", "a")], "q2",
                                                                       "vicuna_v1", False),
    "^<image> appears 2 times in the question; at most one": ([], "<image><image>", "vicuna_v1",
                                                              True),
    r"^history\[0\] answer is empty": ([("q", "")], "q2", "vicuna_v1", True),
    "^the question is empty": ([], "", "vicuna_v1", False),
    r"^history\[0\] answer contains the literal text '</s>'": ([("q", "a</s>b")], "q2", "qa",
                                                               True),
    "^unknown template 'chatml'": ([], "q", "chatml", True),
}


@pytest.mark.parametrize("message", sorted(PROMPT_ERRORS))
def test_bad_prompts_name_the_culprit(model_path, message):
  history, question, template, has_image = PROMPT_ERRORS[message]
  tok = load(model_path, True)
  with pytest.raises(ConversationError, match=message) as e:
    templates.prompt_for_conversation(history, question, tok, template, has_image)
  assert "\n" not in str(e.value)


def test_plain_generation_prompt_needs_an_image(model_path):
  tok = load(model_path, True)
  with pytest.raises(ConversationError, match="^the plain template needs an image"):
    templates.prompt_for_generation("q", tok, "plain", has_image=False)
  assert templates.prompt_for_generation("any text", tok, "plain", True) == [1, IMAGE_TOKEN_ID]
