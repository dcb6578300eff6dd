"""Conversation templates `plain` and `vicuna_v1`: token ids and label masks.

Reproduces the official LLaVA preprocessing without its silent masking. A
third template, `qa`, is ours, for small models trained from scratch
(configs/tiny.py): no system prompt, and the image placeholder after the first
question instead of before it ("USER: {q}<image>ASSISTANT: {a}</s>"),
so that the visual tokens can attend to the question. The prompt text is split
at `<image>`; each chunk is tokenized on its own (BOS only at the very start;
the chunk after the image starts with the dummy-prefix "▁" before its "\\n")
and `IMAGE_TOKEN_ID` goes between. Labels cover exactly each answer and its
`</s>` (vicuna_v1) or the caption and its "\\n" (plain); everything else is
`IGNORE_INDEX`.

Stripping follows LLaVA exactly. Training (encode_conversation): the first
question of a sample with an image becomes "<image>\\n" + its text without
`<image>`, stripped (the whole then stripped once more, so "<image>" alone stays
"<image>"); text-only samples and later questions keep their text verbatim.
Generation (prompt_for_generation, prompt_for_conversation): a question that
holds `<image>` is treated as in training; one without it gets "<image>\\n" +
the question verbatim, as LLaVA's evaluation scripts do.

The ids are built segment by segment, so the answer spans are known by
construction: a segment boundary is either a special token or sits right
before the space that starts an answer (" " + answer after "ASSISTANT:"), and
SentencePiece pieces never span "x▁". Each chunk is then checked against its
whole-chunk tokenization; a disagreement raises `ConversationError`
(the official code would silently mask the sample).
"""
# The tokenizer (a data.tokenizer.Tokenizer) is an argument, not an import: data.tokenizer
# imports data.records, which imports this module.

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
TEMPLATES = ("plain", "vicuna_v1", "qa")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
EOS_TEXT = "</s>"


class ConversationError(ValueError):
  """A sample whose conversation cannot be templated; the message names it."""


def encode_conversation(conversations, tokenizer: "Tokenizer", template: str, has_image: bool,
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
  turns = list(conversations)
  turns[0] = {**turns[0], "value": _first_question(turns[0]["value"], has_image)}
  builder = _Builder(tokenizer)
  try:
    _FORMATS[template](builder, turns)
    return builder.finish()
  except _Inconsistent as e:
    raise ConversationError(f"sample {sample_id}: the {template} template does not tokenize "
                            f"consistently: {e}") from None


def prompt_for_generation(question: str, tokenizer: "Tokenizer", template: str = "vicuna_v1",
                          has_image: bool = True) -> list[int]:
  """Ids of a one-question prompt for generation: `prompt_for_conversation([], question, ...)`.

  vicuna_v1: BOS, system prompt, " USER: " + ("<image>\\n" +) question + " ASSISTANT:".
  qa: "USER: " + question (+ "<image>") + " ASSISTANT:". plain: BOS and the
  image placeholder only (the question is dropped, as in LLaVA's pretraining).
  See prompt_for_conversation for where the image goes and what is stripped.

  Raises:
    ConversationError: the template is unknown, plain without an image, or
      the question cannot be templated.
  """
  return prompt_for_conversation([], question, tokenizer, template, has_image)


def prompt_for_conversation(history, question: str, tokenizer: "Tokenizer",
                            template: str = "vicuna_v1", has_image: bool = True) -> list[int]:
  """Ids of a multi-turn prompt: earlier rounds, then `question`, open for the answer.

  vicuna_v1 renders what LLaVA's conversation object (SeparatorStyle.TWO)
  renders: SYSTEM + " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"; qa the
  same without system prompt and with the image after the first question. The
  image goes in the first question (history[0][0], or `question` when there
  is no history): one holding `<image>` is handled as in training (moved to
  the front, text stripped); one without it gets "<image>\\n" + its text
  verbatim, as LLaVA's evaluation scripts do. Other texts are kept verbatim.
  The ids equal encode_conversation's for the same turns up to the last
  "ASSISTANT:".

  Args:
    history: earlier rounds as (question, answer) pairs of strings, oldest first.
    question: the question to answer.
    tokenizer: a `Tokenizer`.
    template: "vicuna_v1", "qa" or "plain" (plain: no history, image required).
    has_image: the prompt carries an image (one IMAGE_TOKEN_ID in the ids).

  Returns:
    Token ids, BOS first, with IMAGE_TOKEN_ID where the image goes.

  Raises:
    ConversationError: a bad template, history entry or text; the message names it.
  """
  if template not in TEMPLATES:
    raise ConversationError(f"unknown template {template!r} (one of {', '.join(TEMPLATES)})")
  turns = _prompt_turns(history, question)
  problem = _prompt_problem(turns, template, has_image)
  if problem:
    raise ConversationError(problem)
  if has_image:
    turns[0] = {**turns[0], "value": _asked_question(turns[0]["value"])}
  if template != "plain":
    problem = _vicuna_v1_problem(turns, lambda i: _where(i, len(turns)))
    if problem:
      raise ConversationError(problem)
  builder = _Builder(tokenizer)
  try:
    _FORMATS[template](builder, turns)
    return builder.finish()[0]
  except _Inconsistent as e:
    raise ConversationError(f"the {template} prompt does not tokenize consistently: {e}"
                            ) from None


def _prompt_turns(history, question) -> list[dict]:
  """(question, answer) pairs and the question -> LLaVA turns ending on a human one."""
  if isinstance(history, (str, dict)) or not hasattr(history, "__iter__"):
    raise ConversationError(f"history must be a list of (question, answer) pairs, got "
                            f"{type(history).__name__}")
  turns = []
  for k, pair in enumerate(history):
    if (isinstance(pair, (str, dict)) or not hasattr(pair, "__len__") or len(pair) != 2
        or not all(isinstance(t, str) for t in pair)):
      raise ConversationError(f"history[{k}] is {pair!r:.80}; expected a (question, answer) "
                              f"pair of strings")
    turns += [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}]
  if not isinstance(question, str):
    raise ConversationError(f"the question must be a string, got {type(question).__name__}")
  return turns + [{"from": "human", "value": question}]


def _where(i: int, n: int) -> str:
  """Turn i of an n-turn prompt, named the way the caller gave it."""
  if i == n - 1:
    return "the question"
  return f"history[{i // 2}] {'answer' if i % 2 else 'question'}"


def _prompt_problem(turns, template: str, has_image: bool) -> str | None:
  """What makes a prompt untemplatable (None: nothing); names the history entry."""
  if template == "plain":
    if not has_image:
      return ("the plain template needs an image (its prompt is <image> + caption); use "
              "vicuna_v1 or qa for a text-only prompt")
    if len(turns) > 1:
      return f"the plain template has one round; got a history of {len(turns) // 2}"
  counts = [t["value"].count(IMAGE_TOKEN) for t in turns]
  where = [i for i, c in enumerate(counts) if c]
  if not has_image and where:
    return f"a prompt without image has {IMAGE_TOKEN} in {_where(where[0], len(turns))}"
  if has_image and counts[0] > 1:
    return (f"{IMAGE_TOKEN} appears {counts[0]} times in {_where(0, len(turns))}; "
            f"at most one is allowed")
  if has_image and where and where[-1] > 0:
    return (f"{IMAGE_TOKEN} outside the first question ({_where(where[-1], len(turns))}); "
            f"the image goes in the first question")
  return None


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


def _vicuna_v1_problem(conversations, name=lambda i: f"turn {i}") -> str | None:
  """Turn texts that the official vicuna_v1 rounds cannot hold; `name(i)` names turn i."""
  for i, turn in enumerate(conversations):
    if not turn["value"]:
      return (f"{name(i)} is empty (the official vicuna_v1 prompt then drops its separator and "
              f"masks the sample)")
    if EOS_TEXT in turn["value"]:
      return (f"{name(i)} contains the literal text {EOS_TEXT!r}, which splits the vicuna_v1 "
              f"rounds (the official code masks the sample)")
  return None


def without_image(text: str) -> str:
  """The text with its `<image>` placeholder removed, stripped."""
  return text.replace(IMAGE_TOKEN, "").strip()


def image_first(text: str) -> str:
  """LLaVA's training rule for a question with the image: "<image>\\n" + the text
  without `<image>`, stripped, and the whole stripped ("<image>" alone stays so)."""
  return (IMAGE_TOKEN + "\n" + without_image(text)).strip()


def _first_question(text: str, has_image: bool) -> str:
  """The first question of a training sample: `image_first`, or verbatim without image."""
  return image_first(text) if has_image else text


def _asked_question(text: str) -> str:
  """The first question of a generation prompt with an image: the training rule when
  it holds `<image>`, else "<image>\\n" + the text verbatim (LLaVA's eval scripts)."""
  return image_first(text) if IMAGE_TOKEN in text else IMAGE_TOKEN + "\n" + text


def one_round(conversations, k: int, has_image: bool) -> list:
  """Round k (the k-th human-gpt pair) as a conversation of its own; with an image,
  its question carries the `<image>` (at the front, where LLaVA puts it)."""
  question, answer = dict(conversations[2 * k]), conversations[2 * k + 1]
  question["value"] = _first_question(question["value"], has_image)
  return [question, answer]


def _qa_prompt(question: str) -> str:
  """qa: "USER: {q} ASSISTANT:", or for a question that starts with the image
  ("<image>" or "<image>\\n" + q) "USER: {q}<image>ASSISTANT:" (the text after the
  image starts a chunk, so it tokenizes as " ASSISTANT:")."""
  if not question.startswith(IMAGE_TOKEN):
    return f"USER: {question} ASSISTANT:"
  body = question[len(IMAGE_TOKEN):]
  body = body[1:] if body.startswith("\n") else body
  return f"USER: {body}{IMAGE_TOKEN}ASSISTANT:"


def _plain(builder, turns):
  """`<image>` + caption + "\\n"; loss on the caption and "\\n". Without an answer
  (a prompt), `<image>` only.

  The human turn's text is dropped, as in LLaVA's pretraining.
  """
  builder.image()
  if len(turns) > 1:
    builder.text(turns[1]["value"] + "\n", label=True)


def _vicuna_v1(builder, turns):
  """SYSTEM + " USER: {q} ASSISTANT: {a}</s>" per round; loss on " {a}</s>".

  `turns` hold the final texts (the image already at the front of turn 0); a
  last human turn without answer ends the ids at its "ASSISTANT:".
  """
  head = SYSTEM + " "
  for r in range(0, len(turns), 2):
    builder.prompt(f"{head}USER: {turns[r]['value']} ASSISTANT:")
    if r + 1 < len(turns):
      builder.text(" " + turns[r + 1]["value"] + EOS_TEXT, label=True, dummy_prefix=False)
    head = ""


def _qa(builder, turns):
  """"USER: {q} ASSISTANT: {a}</s>" per round, the image right after the first
  question; no system prompt; loss on " {a}</s>". Ends like `_vicuna_v1`."""
  for r in range(0, len(turns), 2):
    builder.prompt(_qa_prompt(turns[r]["value"]))
    if r + 1 < len(turns):
      builder.text(" " + turns[r + 1]["value"] + EOS_TEXT, label=True, dummy_prefix=False)


_FORMATS = {"plain": _plain, "vicuna_v1": _vicuna_v1, "qa": _qa}


class _Inconsistent(Exception):
  """Segment-wise ids differ from the chunk's own tokenization."""


class _Builder:
  """Accumulates (ids, labels) segment by segment, checking each chunk."""

  def __init__(self, tok: "Tokenizer"):
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
