"""The HTTP server of serve.py: an OpenAI-style chat endpoint over a batched engine.

Routes (JSON unless said otherwise):

  POST /v1/chat/completions  one question about one image (mqt/chat_api.py has the
                             format) -> a chat.completion with usage.visual_tokens (m),
                             usage.bucket, usage.flops, usage.latency_ms
  GET  /health               503 {"status": "compiling"} until every bucket's program is
                             compiled, then 200 {"status": "ok", "buckets", "compile_s"}
  GET  /metrics              the batcher's counters and the HTTP responses by status
  GET  /                     the page (mqt/page.html): upload an image, ask at an m or a
                             FLOPs budget, compare answers at several m

It is the standard library's ThreadingHTTPServer: one thread per connection, each
request handed to the engine (mqt/serving.py's Batcher), which batches concurrent
requests. m comes from the request: `m`, `flops_budget`, `latency_budget_ms` (the
latency table measured by latency.py) or the server's default (mqt/budget.py's
choose_m). Every refusal is a 4xx JSON error naming the culprit; an unexpected
exception in a handler is a 500 JSON error, and the server keeps serving.
"""
import collections
import concurrent.futures
import http.server
import importlib.resources
import json
import threading
import time

from mqt import budget
from mqt import chat_api
from mqt import inference

CHAT, HEALTH, METRICS, PAGE = "/v1/chat/completions", "/health", "/metrics", "/"
ROUTES = {CHAT: "POST", HEALTH: "GET", METRICS: "GET", PAGE: "GET"}
MAX_BODY_BYTES = 16 << 20
PAGE_QUESTION = "What colour is the circle?"  # Sizes the page's FLOPs slider.


def page_html() -> str:
  """The page's template (shipped beside this module)."""
  return importlib.resources.files("mqt").joinpath("page.html").read_text(encoding="utf-8")


class App:
  """What the request handlers share: the model's facts, the engine once it is ready
  (`set_engine`), the latency table (or why there is none) and the response counters.

  engine: an object with `submit(image, prompt, m, max_new_tokens)` -> a Future of a
  serving.Result, and `metrics()` -> dict (serving.Batcher)."""

  def __init__(self, *, tokenizer, template: str, model_cfg, max_new_tokens: int,
               max_prompt_tokens: int, default_m: int, model_name: str = "mqt-llava",
               table=None, table_problem: str = "", max_body_bytes: int = MAX_BODY_BYTES,
               timeout_s: float = 600.0):
    self.tokenizer, self.template, self.model_cfg = tokenizer, template, model_cfg
    self.big_m = int(model_cfg.query.num_queries)
    self.image_size = int(model_cfg.vision.image_size)
    self.max_new_tokens, self.max_prompt_tokens = int(max_new_tokens), int(max_prompt_tokens)
    self.default_m, self.model_name = int(default_m), model_name
    self.table, self.table_problem = table, table_problem
    self.max_body_bytes, self.timeout_s = int(max_body_bytes), float(timeout_s)
    self.engine, self.buckets, self.compile_s, self.failure = None, (), 0.0, ""
    self.compiled: list[int] = []
    self._lock = threading.Lock()
    self._statuses = collections.Counter()
    self._page = None

  # -- state ------------------------------------------------------------------------------
  def compiled_bucket(self, bucket: int) -> None:
    self.compiled.append(int(bucket))

  def set_engine(self, engine, buckets, compile_s: float) -> None:
    """The engine is ready: requests are served from now on."""
    self.buckets, self.compile_s = tuple(int(b) for b in buckets), float(compile_s)
    self.engine = engine

  def set_failed(self, message: str) -> None:
    self.failure = message

  def count(self, status: int) -> None:
    with self._lock:
      self._statuses[int(status)] += 1

  # -- routes -----------------------------------------------------------------------------
  def health(self) -> tuple[int, dict]:
    if self.failure:
      return 500, {"status": "failed", "error": self.failure}
    if self.engine is None:
      return 503, {"status": "compiling", "compiled": list(self.compiled)}
    return 200, {"status": "ok", "buckets": list(self.buckets),
                 "compile_s": round(self.compile_s, 3), "M": self.big_m}

  def metrics(self) -> tuple[int, dict]:
    with self._lock:
      http = {str(k): v for k, v in sorted(self._statuses.items())}
    engine = self.engine.metrics() if self.engine is not None else {}
    return 200, {"status": "ok" if self.engine is not None else "compiling", **engine,
                 "http": http}

  def page(self) -> str:
    """The page with this model's M, default m and FLOPs per m filled in."""
    if self._page is None:
      try:
        text_len = len(self.encode(PAGE_QUESTION))
      except chat_api.ApiError:
        text_len = 1
      flops = {m: budget.sample_flops(self.model_cfg, m, text_len, self.max_new_tokens)
               for m in range(1, self.big_m + 1)}
      values = {"BIG_M": str(self.big_m), "DEFAULT_M": str(self.default_m),
                "MAX_NEW_TOKENS": str(self.max_new_tokens), "MODEL": self.model_name,
                "FLOPS_JSON": json.dumps({"text_len": text_len, "flops": flops})}
      html = page_html()
      for key, value in values.items():
        html = html.replace("{{" + key + "}}", value)
      self._page = html
    return self._page

  def encode(self, question: str) -> list[int]:
    try:
      prompt = inference.encode_prompt(question, self.tokenizer, True, self.template)
    except ValueError as e:
      raise chat_api.ApiError(400, f"the question cannot be templated: {e}") from None
    if len(prompt) > self.max_prompt_tokens:
      raise chat_api.ApiError(400, f"the prompt has {len(prompt)} tokens (the question in its "
                              f"template), more than this server's --max_prompt_tokens="
                              f"{self.max_prompt_tokens}: ask a shorter question")
    return prompt

  def choose(self, req: chat_api.ChatRequest, text_len: int) -> tuple[int, str]:
    """The request's m and why (budget.choose_m)."""
    if req.choice == "default":
      return self.default_m, f"m={self.default_m}: the server's default (--default_m)"
    if req.choice == "latency_budget_ms" and self.table is None:
      raise chat_api.ApiError(400, f"latency_budget_ms needs a latency table, and this server "
                              f"has none: {self.table_problem}")
    value = int(req.value) if req.choice == "m" else req.value
    try:
      return budget.choose_m(self.model_cfg, text_len, req.max_tokens, table=self.table,
                             **{req.choice: value})
    except ValueError as e:
      raise chat_api.ApiError(400, f"{req.choice}={value:g}: {e}") from None

  def chat(self, body: bytes) -> tuple[int, dict]:
    """One chat request -> (200, completion); ApiError otherwise."""
    if self.engine is None:
      raise chat_api.ApiError(503, "the server is still compiling its programs: retry when "
                              "GET /health answers 200")
    t0 = time.perf_counter()
    req = chat_api.parse_chat(body, image_size=self.image_size, big_m=self.big_m,
                              max_new_tokens=self.max_new_tokens)
    prompt = self.encode(req.question)
    m, why = self.choose(req, len(prompt))
    try:
      future = self.engine.submit(req.image, prompt, m, req.max_tokens)
    except ValueError as e:
      raise chat_api.ApiError(400, str(e)) from None
    except RuntimeError as e:  # Closed: the server is shutting down.
      raise chat_api.ApiError(503, str(e)) from None
    try:
      result = future.result(timeout=self.timeout_s)
    except concurrent.futures.TimeoutError:
      raise chat_api.ApiError(504, f"no answer within {self.timeout_s:g} s") from None
    flops = budget.sample_flops(self.model_cfg, m, len(prompt), req.max_tokens)
    return 200, chat_api.completion(
        result.text, model=req.model or self.model_name, m=result.m, bucket=result.bucket,
        prompt_tokens=result.prompt_tokens, completion_tokens=result.new_tokens,
        finish_reason=result.finish_reason, flops=flops,
        latency_ms=(time.perf_counter() - t0) * 1e3, queue_ms=result.queue_s * 1e3,
        batch_size=result.batch_size, why_m=why)


class Handler(http.server.BaseHTTPRequestHandler):
  """Routes requests to `server.app` (an App); JSON errors for everything refused."""
  protocol_version = "HTTP/1.1"
  server_version = "mqt-serve"
  timeout = 60  # Seconds a connection may stall mid-request (or idle between requests).
  disable_nagle_algorithm = True  # Headers and body go out as two writes: no 40 ms stall.

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args  # Quiet: /metrics counts the responses.

  @property
  def app(self) -> App:
    return self.server.app

  def _send(self, status: int, body: bytes, content_type: str, extra=()) -> None:
    self.app.count(status)
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    for key, value in extra:
      self.send_header(key, value)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, payload: dict, extra=()) -> None:
    self._send(status, json.dumps(payload).encode("utf-8"), "application/json", extra)

  def _error(self, status: int, message: str, extra=()) -> None:
    kind = "invalid_request_error" if status < 500 else "server_error"
    self._json(status, chat_api.error_body(message, kind), extra)

  def _body(self) -> bytes:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      self.close_connection = True
      raise chat_api.ApiError(411, "chunked request bodies are not accepted: send a "
                              "Content-Length")
    length = self.headers.get("Content-Length")
    if length is None:
      self.close_connection = True
      raise chat_api.ApiError(411, "the request has no Content-Length header")
    try:
      n = int(length)
      if n < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      raise chat_api.ApiError(400, f"Content-Length {length!r} is not a byte count") from None
    if n > self.app.max_body_bytes:
      # Up to 4x the limit the body is read and dropped, so that the client, still
      # sending, gets the answer; beyond, the connection is closed unread.
      if n <= 4 * self.app.max_body_bytes:
        left = n
        while left > 0:
          chunk = self.rfile.read(min(left, 1 << 20))
          if not chunk:
            break
          left -= len(chunk)
        self.close_connection = left > 0
      else:
        self.close_connection = True
      raise chat_api.ApiError(413, f"the request body is {n} bytes, more than this server's "
                              f"limit of {self.app.max_body_bytes} bytes")
    body = self.rfile.read(n)
    if len(body) != n:
      self.close_connection = True
      raise chat_api.ApiError(400, f"the request body ended after {len(body)} of {n} bytes")
    return body

  def _handle(self) -> None:
    path = self.path.split("?", 1)[0]
    try:
      if path not in ROUTES:
        raise chat_api.ApiError(404, f"no such path {path!r}; the routes are "
                                f"{', '.join(f'{v} {k}' for k, v in ROUTES.items())}")
      method = "GET" if self.command == "HEAD" else self.command
      if method != ROUTES[path]:
        if self.command == "POST" or self.headers.get("Content-Length"):
          self.close_connection = True  # An unread body would corrupt the next request.
        self._error(405, f"{self.command} {path} is not allowed; use {ROUTES[path]}",
                    [("Allow", ROUTES[path])])
        return
      if path == PAGE:
        self._send(200, self.app.page().encode("utf-8"), "text/html; charset=utf-8")
      elif path == HEALTH:
        self._json(*self.app.health())
      elif path == METRICS:
        self._json(*self.app.metrics())
      else:
        self._json(*self.app.chat(self._body()))
    except chat_api.ApiError as e:
      self._error(e.status, e.message)
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:  # pylint: disable=broad-except  (never a dead server)
      self.close_connection = True
      try:
        self._error(500, f"internal error: {type(e).__name__}: {e}")
      except OSError:
        pass

  do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle


class Server(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer with a deeper listen queue (many clients connect at once)."""
  request_queue_size = 128
  daemon_threads = True

  def __init__(self, address, app: App):
    super().__init__(address, Handler)
    self.app = app

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"


def start(app: App, host: str = "127.0.0.1", port: int = 0) -> Server:
  """Binds (port 0: any free port) and serves on a daemon thread; `server.shutdown()`
  stops it."""
  server = Server((host, port), app)
  threading.Thread(target=server.serve_forever, name="mqt-http", daemon=True).start()
  return server
