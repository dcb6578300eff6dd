"""Conversation templates `plain` and `vicuna_v1`: token ids and label masks.

Reproduces the official LLaVA preprocessing (SPEC section 4) without its
silent masking. A third template, `qa`, is ours, for small models trained from
scratch (configs/tiny.py): no system prompt, and the image placeholder after the
first question instead of before it ("USER: {q}<image>ASSISTANT: {a}</s>"),
so that the visual tokens can attend to the question. The prompt text is split
at `<image>`; each chunk is tokenized on its own (BOS only at the very start;
the chunk after the image starts with the dummy-prefix "▁" before its "\\n")
and `IMAGE_TOKEN_ID` goes between. Labels cover exactly each answer and its
`</s>` (vicuna_v1) or the caption and its "\\n" (plain); everything else is
`IGNORE_INDEX`.

The ids are built segment by segment, so the answer spans are known by
construction: a segment boundary is either a special token or sits right
before the space that starts an answer (" " + answer after "ASSISTANT:"), and
SentencePiece pieces never span "x▁". Each chunk is then checked against its
whole-chunk tokenization; a disagreement raises `ConversationError`
(the official code would silently mask the sample).
"""
from data.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
TEMPLATES = ("plain", "vicuna_v1", "qa")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
EOS_TEXT = "</s>"


class ConversationError(ValueError):
  """A sample whose conversation cannot be templated; the message names it."""


def encode_conversation(conversations, tokenizer: Tokenizer, template: str, has_image: bool,
                        sample_id="?") -> tuple[list[int], list[int]]:
  """LLaVA conversation -> (input_ids, labels).

  Args:
    conversations: [{"from": "human" | "gpt", "value": str}, ...].
    tokenizer: a `Tokenizer`; its `legacy` flag decides the text after `</s>`.
    template: "plain" or "vicuna_v1".
    has_image: the sample has an image (then `<image>` is in its first turn).
    sample_id: named in error messages.

  Returns:
    ids and labels, equally long; labels are IGNORE_INDEX where no loss.

  Raises:
    ConversationError: the conversation or template is invalid.
  """
  problem = _problem(conversations, template, has_image)
  if problem:
    raise ConversationError(f"sample {sample_id}: {problem}")
  builder = _Builder(tokenizer)
  try:
    _FORMATS[template](builder, conversations, has_image)
    return builder.finish()
  except _Inconsistent as e:
    raise ConversationError(f"sample {sample_id}: the {template} template does not tokenize "
                            f"consistently: {e}") from None


def prompt_for_generation(question: str, tokenizer: Tokenizer, template: str = "vicuna_v1",
                          has_image: bool = True) -> list[int]:
  """Ids of a one-question prompt for generation.

  vicuna_v1: system prompt, " USER: " + ("<image>\\n" +) question + " ASSISTANT:"
  (an `<image>` in the question is moved to the front). qa: "USER: " + question
  (+ "<image>") + " ASSISTANT:". plain: BOS and the image placeholder only.
  """
  builder = _Builder(tokenizer)
  if template == "plain":
    builder.image()
  elif template in ("vicuna_v1", "qa"):
    if not has_image and IMAGE_TOKEN in question:
      raise ConversationError(f"a question without image contains {IMAGE_TOKEN}")
    if template == "vicuna_v1":
      builder.prompt(f"{SYSTEM} USER: {_first_question(question, has_image)} ASSISTANT:")
    else:
      builder.prompt(_qa_prompt(question, has_image))
  else:
    raise ConversationError(f"unknown template {template!r} (one of {', '.join(TEMPLATES)})")
  return builder.finish()[0]


def _problem(conversations, template: str, has_image: bool) -> str | None:
  """What makes the sample untemplatable (None: nothing)."""
  if template not in TEMPLATES:
    return f"unknown template {template!r} (one of {', '.join(TEMPLATES)})"
  problem = _conversation_problem(conversations, has_image)
  if problem or template in ("vicuna_v1", "qa"):
    return problem or _vicuna_v1_problem(conversations)
  if not has_image:
    return "the plain template needs an image"
  if len(conversations) != 2:
    return f"the plain template needs one human and one gpt turn, got {len(conversations)}"
  return None


def _conversation_problem(conversations, has_image: bool) -> str | None:
  """What is wrong with the turns (None: nothing)."""
  if not conversations:
    return "empty conversation"
  for i, turn in enumerate(conversations):
    want = "human" if i % 2 == 0 else "gpt"
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      return f"turn {i} is not a {{'from': ..., 'value': str}} dict"
    if turn.get("from") != want:
      first = "the first turn must be from 'human'" if i == 0 else "turns must alternate"
      return f"turn {i} is from {turn.get('from')!r}, expected {want!r} ({first})"
  if len(conversations) % 2:
    return "the conversation ends on a human turn with no answer"
  counts = [t["value"].count(IMAGE_TOKEN) for t in conversations]
  where = [i for i, c in enumerate(counts) if c]
  if not has_image:
    if where:
      return f"text-only sample (no image) has {IMAGE_TOKEN} in turn {where[0]}"
    return None
  if not counts[0]:
    found = f" (found in turn {where[0]})" if where else ""
    return f"has an image but no {IMAGE_TOKEN} in its first human turn{found}"
  if counts[0] > 1:
    return f"{IMAGE_TOKEN} appears {counts[0]} times in the first turn; exactly one is allowed"
  if len(where) > 1:
    return f"{IMAGE_TOKEN} outside the first human turn (turn {where[1]})"
  return None


def _vicuna_v1_problem(conversations) -> str | None:
  """Turn texts that the official vicuna_v1 rounds cannot hold."""
  for i, turn in enumerate(conversations):
    if not turn["value"]:
      return (f"turn {i} is empty (the official vicuna_v1 prompt then drops its separator and "
              f"masks the sample)")
    if EOS_TEXT in turn["value"]:
      return (f"turn {i} contains the literal text {EOS_TEXT!r}, which splits the vicuna_v1 "
              f"rounds (the official code masks the sample)")
  return None


def without_image(text: str) -> str:
  """The text with its `<image>` placeholder removed, stripped."""
  return text.replace(IMAGE_TOKEN, "").strip()


def _first_question(text: str, has_image: bool) -> str:
  """LLaVA moves the image to the front: "<image>\\n" + the stripped text."""
  if not has_image:
    return text
  return IMAGE_TOKEN + "\n" + without_image(text)


def one_round(conversations, k: int, has_image: bool) -> list:
  """Round k (the k-th human-gpt pair) as a conversation of its own; with an image,
  its question carries the `<image>` (at the front, where LLaVA puts it)."""
  question, answer = dict(conversations[2 * k]), conversations[2 * k + 1]
  question["value"] = _first_question(question["value"], has_image)
  return [question, answer]


def _qa_prompt(question: str, has_image: bool) -> str:
  """qa: "USER: {q} ASSISTANT:", or with an image "USER: {q}<image>ASSISTANT:" (q
  stripped of its `<image>`; the text after the image starts a chunk, so it
  tokenizes as " ASSISTANT:")."""
  if not has_image:
    return f"USER: {question} ASSISTANT:"
  return f"USER: {without_image(question)}{IMAGE_TOKEN}ASSISTANT:"


def _plain(builder, conversations, has_image: bool):
  """`<image>` + caption + "\\n"; loss on the caption and "\\n".

  The human turn's text is dropped, as in LLaVA's pretraining.
  """
  del has_image  # Always true here.
  builder.image()
  builder.text(conversations[1]["value"] + "\n", label=True)


def _vicuna_v1(builder, conversations, has_image: bool):
  """SYSTEM + " USER: {q} ASSISTANT: {a}</s>" per round; loss on " {a}</s>"."""
  head = SYSTEM + " "
  for r in range(0, len(conversations), 2):
    question = conversations[r]["value"]
    if r == 0:
      question = _first_question(question, has_image)
    builder.prompt(f"{head}USER: {question} ASSISTANT:")
    builder.text(" " + conversations[r + 1]["value"] + EOS_TEXT, label=True, dummy_prefix=False)
    head = ""


def _qa(builder, conversations, has_image: bool):
  """"USER: {q} ASSISTANT: {a}</s>" per round, the image right after the first
  question; no system prompt; loss on " {a}</s>"."""
  for r in range(0, len(conversations), 2):
    builder.prompt(_qa_prompt(conversations[r]["value"], has_image and r == 0))
    builder.text(" " + conversations[r + 1]["value"] + EOS_TEXT, label=True, dummy_prefix=False)


_FORMATS = {"plain": _plain, "vicuna_v1": _vicuna_v1, "qa": _qa}


class _Inconsistent(Exception):
  """Segment-wise ids differ from the chunk's own tokenization."""


class _Builder:
  """Accumulates (ids, labels) segment by segment, checking each chunk."""

  def __init__(self, tok: Tokenizer):
    self.tok = tok
    self.ids, self.labels = [tok.bos_id], [IGNORE_INDEX]
    self.chunk_text, self.chunk_start = "", 0

  def text(self, s: str, label: bool, dummy_prefix: bool | None = None):
    """Appends `s`, labelled or not.

    `dummy_prefix` defaults to the tokenizer's rule: at a chunk start, and
    after a special token when legacy. False: `s` continues the text.
    """
    if dummy_prefix is None:
      dummy_prefix = not self.chunk_text or (self.tok.legacy and self._after_special())
    ids = self.tok.encode(s, dummy_prefix=dummy_prefix)
    self.ids += ids
    self.labels += ids if label else [IGNORE_INDEX] * len(ids)
    self.chunk_text += s

  def prompt(self, s: str):
    """Unlabelled text that may hold the image placeholder."""
    before, sep, after = s.partition(IMAGE_TOKEN)
    self.text(before, label=False)
    if sep:
      self.image()
      self.text(after, label=False)

  def image(self):
    self._check_chunk()
    self.ids.append(IMAGE_TOKEN_ID)
    self.labels.append(IGNORE_INDEX)
    self.chunk_text, self.chunk_start = "", len(self.ids)

  def finish(self) -> tuple[list[int], list[int]]:
    self._check_chunk()
    return self.ids, self.labels

  def _after_special(self) -> bool:
    return self.chunk_text.endswith(self.tok.special_texts)

  def _check_chunk(self):
    first = self.chunk_start == 0
    want = self.tok.encode(self.chunk_text, bos=first)
    got = self.ids[self.chunk_start:]
    if got != want:
      k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
      raise _Inconsistent(f"segment-wise ids differ from the whole chunk's at token {k} "
                          f"({got[k:k + 3]} vs {want[k:k + 3]}) in {self.chunk_text[:200]!r}")
