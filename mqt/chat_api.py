"""The OpenAI chat-completions format of the HTTP server (mqt/server.py): requests in,
responses out.

A request asks one question about one image, in one user message:

  {"model": "...",                      # optional, any name (one model is served)
   "messages": [{"role": "user", "content": [
       {"type": "text", "text": "What colour is the circle?"},
       {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}]}],
   "m": 4,                              # at most one of m / flops_budget /
   "flops_budget": 1.3e7,               #   latency_budget_ms (none: the server's
   "latency_budget_ms": 40,             #   default m)
   "max_tokens": 8}                     # optional, <= the server's max_new_tokens

The image comes inline as a base64 data URL (PNG, JPEG or any format data/images.py
decodes); the server fetches nothing. Several text parts are joined with newlines.
Every problem is an `ApiError` (HTTP status and one line naming the field), raised
before any compute; fields this server does not read (e.g. "stream", "temperature")
are refused by name rather than ignored.
"""
import base64
import binascii
import dataclasses
import json
import math
import re
import time
import uuid

import numpy as np

from data import images as images_lib
from mqt import matryoshka

FIELDS = ("model", "messages", "m", "flops_budget", "latency_budget_ms", "max_tokens")
CHOICES = ("m", "flops_budget", "latency_budget_ms")
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?((?:;[^,;]*)*),(.*)$", re.S)


class ApiError(Exception):
  """A request the server refuses: `status` (4xx/5xx) and a message naming the culprit."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


@dataclasses.dataclass
class ChatRequest:
  question: str
  image: np.ndarray  # [size, size, 3] float32, CLIP-normalized ("pad" mode).
  choice: str  # "m", "flops_budget", "latency_budget_ms" or "default".
  value: float | None  # The chosen field's value (None for "default").
  max_tokens: int
  model: str | None = None


def _bad(message: str) -> ApiError:
  return ApiError(400, message)


def _number(body: dict, key: str, integer: bool = False):
  """A JSON number field (None when absent); bools, strings, NaN are refused."""
  if key not in body or body[key] is None:
    return None
  value = body[key]
  if integer:
    if isinstance(value, bool) or not isinstance(value, int):
      raise _bad(f"{key} must be an integer, got {json.dumps(value)}")
    return value
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise _bad(f"{key} must be a finite number, got {json.dumps(value)}")
  return float(value)


def parse_json(body: bytes) -> dict:
  """The request body -> its JSON object."""
  try:
    parsed = json.loads(body.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise _bad(f"the request body is not UTF-8 text: {e}") from None
  except json.JSONDecodeError as e:
    raise _bad(f"malformed JSON in the request body: {e.msg} at line {e.lineno} column "
               f"{e.colno}") from None
  if not isinstance(parsed, dict):
    raise _bad(f"the request body must be a JSON object, got {type(parsed).__name__}")
  return parsed


def decode_data_url(url, where: str, image_size: int) -> np.ndarray:
  """A base64 data URL -> the preprocessed image [size, size, 3] float32."""
  if not isinstance(url, str):
    raise _bad(f"{where} must be a string (a data:image/...;base64 URL)")
  found = _DATA_URL.match(url.strip())
  if not found:
    shown = url[:40] + ("..." if len(url) > 40 else "")
    raise _bad(f"{where} is not a data URL ({shown!r}): send the image inline as "
               f"data:image/png;base64,... (the server fetches nothing)")
  mime, params, payload = found.groups()
  if not mime:
    raise _bad(f"{where}: the data URL has no image type (data:image/png;base64,...)")
  if "base64" not in [p.strip().lower() for p in params.split(";") if p]:
    raise _bad(f"{where}: the data URL is not base64-encoded (data:{mime};base64,...)")
  try:
    raw = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
  except (binascii.Error, ValueError) as e:
    raise _bad(f"{where}: broken base64 data: {e}") from None
  try:
    img = images_lib.load_image(raw, name=f"{where} ({mime})")
    return images_lib.preprocess(img, image_size, "pad")
  except images_lib.ImageError as e:
    raise _bad(str(e)) from None


def _message_parts(body: dict):
  """-> (text parts, image URLs with where they were), from the one user message."""
  if "messages" not in body:
    raise _bad("'messages' is missing: send one user message with a text and an image_url part")
  messages = body["messages"]
  if not isinstance(messages, list) or not messages:
    raise _bad("'messages' must be a non-empty list of messages")
  if len(messages) != 1:
    raise _bad(f"'messages' has {len(messages)} messages; this server answers one user "
               f"message (one question about one image) per request")
  msg = messages[0]
  if not isinstance(msg, dict):
    raise _bad("messages[0] must be an object with 'role' and 'content'")
  if msg.get("role") != "user":
    raise _bad(f"messages[0].role must be 'user', got {json.dumps(msg.get('role'))}")
  content = msg.get("content")
  if isinstance(content, str):
    raise _bad("messages[0].content is text only: the image is missing (make content a list "
               "with a text part and an image_url part)")
  if not isinstance(content, list) or not content:
    raise _bad("messages[0].content must be a non-empty list of parts")
  texts, urls = [], []
  for i, part in enumerate(content):
    where = f"messages[0].content[{i}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
      if not isinstance(part.get("text"), str):
        raise _bad(f"{where}.text must be a string")
      texts.append(part["text"])
    elif kind == "image_url":
      image_url = part.get("image_url")
      url = image_url.get("url") if isinstance(image_url, dict) else image_url
      if url is None:
        raise _bad(f"{where}.image_url.url is missing")
      urls.append((url, f"{where}.image_url.url"))
    else:
      raise _bad(f"{where} has type {json.dumps(kind)}; the parts are 'text' and 'image_url'")
  return texts, urls


def parse_chat(body: bytes, *, image_size: int, big_m: int, max_new_tokens: int
               ) -> ChatRequest:
  """A request body -> ChatRequest (the image decoded and preprocessed); ApiError (400)
  naming the culprit otherwise. `m` is checked against M here; budgets are checked
  when the server chooses m (mqt/budget.py)."""
  req = parse_json(body)
  unknown = [k for k in req if k not in FIELDS]
  if unknown:
    raise _bad(f"unsupported field{'s' if len(unknown) > 1 else ''} "
               f"{', '.join(repr(k) for k in unknown)}; this server reads {', '.join(FIELDS)}")
  model = req.get("model")
  if model is not None and not isinstance(model, str):
    raise _bad("model must be a string")
  given = [k for k in CHOICES if req.get(k) is not None]
  if len(given) > 1:
    raise _bad(f"give at most one of m, flops_budget, latency_budget_ms; got "
               f"{' and '.join(given)}")
  m = _number(req, "m", integer=True)
  if m is not None:
    try:
      matryoshka.validate_m(m, big_m)
    except ValueError as e:
      raise _bad(f"m: {e}") from None
  value = m
  for key in ("flops_budget", "latency_budget_ms"):
    number = _number(req, key)
    if number is not None:
      if number <= 0:
        raise _bad(f"{key}={number:g} must be > 0")
      value = number
  max_tokens = _number(req, "max_tokens", integer=True)
  if max_tokens is None:
    max_tokens = max_new_tokens
  elif not 1 <= max_tokens <= max_new_tokens:
    raise _bad(f"max_tokens={max_tokens} is out of range: 1 <= max_tokens <= "
               f"{max_new_tokens} (the server's max_new_tokens)")
  texts, urls = _message_parts(req)
  question = "\n".join(texts)
  if not question.strip():
    raise _bad("the question is missing: add a non-empty text part to messages[0].content")
  if not urls:
    raise _bad("the image is missing: add an image_url part with a data:image/png;base64 URL "
               "to messages[0].content")
  if len(urls) > 1:
    raise _bad(f"messages[0].content has {len(urls)} images; send one image per request")
  image = decode_data_url(urls[0][0], urls[0][1], image_size)
  return ChatRequest(question, image, given[0] if given else "default", value, max_tokens,
                     model)


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
  return {"error": {"message": message, "type": kind}}


def completion(answer: str, *, model: str, m: int, bucket: int, prompt_tokens: int,
               completion_tokens: int, finish_reason: str, flops: int, latency_ms: float,
               queue_ms: float, batch_size: int, why_m: str) -> dict:
  """The chat.completion response of one answer."""
  return {
      "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
      "created": int(time.time()), "model": model,
      "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                   "finish_reason": finish_reason}],
      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "visual_tokens": m,
                "bucket": bucket, "flops": int(flops), "latency_ms": round(latency_ms, 3),
                "queue_ms": round(queue_ms, 3), "batch_size": batch_size},
      "mqt": {"why_m": why_m}}


def chat_body(question: str, image_png: bytes, mime: str = "image/png", **fields) -> bytes:
  """A request body asking `question` about an encoded image (for clients and tests);
  `fields`: m / flops_budget / latency_budget_ms / max_tokens / model."""
  url = f"data:{mime};base64,{base64.b64encode(image_png).decode('ascii')}"
  body = {"messages": [{"role": "user", "content": [
      {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}],
          **fields}
  return json.dumps(body).encode("utf-8")
