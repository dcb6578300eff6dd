"""serve.py and its HTTP layer (mqt/server.py, mqt/chat_api.py).

One serve.py subprocess (the command users run) over a one-step checkpoint of
configs/tiny.py, buckets 1, 4, 9, answers every test of this module: /health is 503
while it compiles and 200 after, answers equal inference.answer's at the same m, each
bad request gets its 4xx and the server still answers, concurrent requests of mixed m
are batched, SIGTERM stops it cleanly. An in-process server over a fake engine checks
what a real engine cannot be made to do (a failing engine, a tiny body limit).
"""
import concurrent.futures
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image, ImageDraw

from configs import tiny
from data import tokenizer as tokenizer_lib
from mqt import budget
from mqt import chat_api
from mqt import inference
from mqt import server as server_lib
from mqt import train
from mqt.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What colour is the circle?"
MAX_NEW = 8
BUCKETS = (1, 4, 9)


def build_checkpoint(root) -> str:
  """A workdir with one stage-1 step of configs/tiny.py (its tokenizer and data beside);
  built once per directory."""
  workdir = os.path.join(root, "w")
  if not os.path.isfile(os.path.join(workdir, "summary.json")):  # Written last.
    config = tiny.get_config()
    config.data.builtin_sizes.update(dict(captions=16, instruct=16, eval=8))
    config.run_stages = "1"
    config.stage1.steps = 1
    config.stage1.data.batch_size = 8
    config.checkpoint.use_async = False
    config.eval.ms = ()
    train.train_and_evaluate(config, workdir)
  return workdir


def shape_png(colour=(200, 30, 30), size=(72, 60), box=(16, 10, 52, 46)) -> bytes:
  """A PNG of a filled circle on white."""
  img = Image.new("RGB", size, (255, 255, 255))
  ImageDraw.Draw(img).ellipse(box, fill=colour)
  out = io.BytesIO()
  img.save(out, format="PNG")
  return out.getvalue()


class Served:
  """A serve.py subprocess: its URL, its stdout lines, and what /health said while it
  came up (`health`: (seconds after the listening line, status) per poll)."""

  def __init__(self, workdir: str, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--config=configs/tiny.py",
           f"--workdir={workdir}", "--config.run_stages=1", "--port=0",
           f"--max_new_tokens={MAX_NEW}", *args]
    self.started = time.perf_counter()
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines, self.url, self.health = [], None, []
    self._listening = threading.Event()
    threading.Thread(target=self._read, daemon=True).start()
    if not self._listening.wait(180) or self.url is None:
      self.stop()
      raise AssertionError("serve.py did not start listening:\n" + self.output())
    self.listening_s = time.perf_counter() - self.started

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip("\n"))
      if line.startswith("listening: "):
        self.url = line.split()[1]
        self._listening.set()
    self._listening.set()

  def output(self) -> str:
    return "\n".join(self.lines[-60:])

  def wait_ready(self, timeout: float = 300) -> float:
    """Polls /health until 200 (recording each answer); -> seconds from start. The
    process is killed when it never gets there."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout and self.proc.poll() is None:
      try:
        status, body = request(self.url, "GET", "/health")
      except OSError as e:
        status, body = 0, {"error": repr(e)}
      self.health.append((time.perf_counter() - t0, status, body))
      if status == 200:
        return time.perf_counter() - self.started
      if status != 503 or body.get("status") != "compiling":
        break
      time.sleep(0.2)
    self.stop(signal.SIGKILL)
    raise AssertionError(f"/health never answered 200 (last: {self.health[-1:]}):\n" +
                         self.output())

  def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      return self.proc.wait()


def request(url: str, method: str, path: str, body: bytes | None = None, headers=None,
            timeout: float = 120):
  """-> (status, parsed JSON or the text)."""
  parts = urllib.parse.urlsplit(url)
  conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
  finally:
    conn.close()
  try:
    return resp.status, json.loads(data)
  except ValueError:
    return resp.status, data.decode("utf-8", "replace")


def chat(url: str, png: bytes = None, question: str = QUESTION, **fields):
  png = shape_png() if png is None else png
  return request(url, "POST", "/v1/chat/completions", chat_api.chat_body(question, png, **fields),
                 {"Content-Type": "application/json"})


def shared_checkpoint(tmp_path_factory) -> str:
  """build_checkpoint in one folder of the test session (this module and test_page.py)."""
  return build_checkpoint(str(tmp_path_factory.getbasetemp() / "serve_checkpoint"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def served(workdir):
  server = Served(workdir, f"--buckets={','.join(map(str, BUCKETS[:-1]))}", "--max_wait_ms=50",
                  "--max_prompt_tokens=40", "--max_body_mb=0.25")
  server.early_chat = chat(server.url, m=2)  # While compiling.
  server.ready_s = server.wait_ready()
  yield server
  server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory):
  """answer(png bytes, m) -> inference.answer's greedy answer (one compile per m)."""
  config = tiny.get_config()
  config.run_stages = "1"
  loaded = inference.load(config, workdir)
  gen_cfg = config.eval.generation.copy_and_resolve_references()
  gen_cfg.max_new_tokens = MAX_NEW
  folder = tmp_path_factory.mktemp("images")
  def answer(png: bytes, m: int) -> str:
    path = folder / f"{hash(png)}.png"
    path.write_bytes(png)
    return inference.answer(loaded, [str(path)], [QUESTION], m, gen_cfg)[0]
  answer.loaded = loaded
  return answer


def test_health_is_503_while_compiling_then_200(served):
  statuses = [s for _, s, _ in served.health]
  assert statuses[0] == 503 and statuses[-1] == 200, served.health
  assert served.early_chat[0] == 503 and "compiling" in served.early_chat[1]["error"]["message"]
  _, status, body = served.health[-1]
  assert body["status"] == "ok" and body["buckets"] == list(BUCKETS) and body["M"] == 9
  assert body["compile_s"] > 0
  lines = "\n".join(served.lines)
  for b, i in zip(BUCKETS, range(1, 4)):
    assert f"compiled bucket {b} ({i}/3) in " in lines, lines
  assert f"ready: {served.url}" in lines
  print(f"serve.py: listening after {served.listening_s:.1f} s, /health 200 after "
        f"{served.ready_s:.1f} s")
  assert served.ready_s < 120, served.output()


@pytest.mark.parametrize("m, bucket", [(1, 1), (3, 4), (9, 9)])
def test_answer_at_m_equals_inference_answer(served, reference, m, bucket):
  png = shape_png()
  status, out = chat(served.url, png, m=m)
  assert status == 200, out
  usage = out["usage"]
  assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == \
      "assistant"
  assert usage["visual_tokens"] == m and usage["bucket"] == bucket
  assert 1 <= usage["completion_tokens"] <= MAX_NEW
  assert out["choices"][0]["finish_reason"] in ("stop", "length")
  prompt = inference.encode_prompt(QUESTION, reference.loaded.tokenizer, True, "qa")
  assert usage["prompt_tokens"] == len(prompt) + m - 1
  assert usage["flops"] == budget.sample_flops(reference.loaded.model_cfg, m, len(prompt),
                                               MAX_NEW)
  assert usage["latency_ms"] > 0 and out["mqt"]["why_m"].startswith(f"m={m}: as asked")
  assert out["choices"][0]["message"]["content"] == reference(png, m)


def test_flops_budget_picks_m_for_flops(served, reference):
  cfg = reference.loaded.model_cfg
  text_len = len(inference.encode_prompt(QUESTION, reference.loaded.tokenizer, True, "qa"))
  cost = [budget.sample_flops(cfg, m, text_len, 4) for m in (5, 6)]
  target = (cost[0] + cost[1]) / 2  # Between m = 5 and m = 6 at 4 new tokens.
  assert budget.m_for_flops(cfg, target, text_len, 4) == 5
  status, out = chat(served.url, flops_budget=target, max_tokens=4)
  assert status == 200, out
  assert out["usage"]["visual_tokens"] == 5 and out["usage"]["bucket"] == 9
  assert out["usage"]["flops"] == cost[0] <= target
  assert out["usage"]["completion_tokens"] <= 4
  assert "fit the budget" in out["mqt"]["why_m"]
  status, out = chat(served.url)  # Neither m nor a budget: the default m (M).
  assert status == 200 and out["usage"]["visual_tokens"] == 9, out


def _png_b64(data: bytes) -> str:
  import base64  # pylint: disable=import-outside-toplevel
  return base64.b64encode(data).decode()


def _body(content=None, **fields) -> bytes:
  if content is None:
    content = [{"type": "text", "text": QUESTION},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                   _png_b64(shape_png())}}]
  return json.dumps({"messages": [{"role": "user", "content": content}], **fields}).encode()


def _image(url: str) -> bytes:
  return _body([{"type": "text", "text": QUESTION}, {"type": "image_url",
                                                     "image_url": {"url": url}}])


BAD = [  # (name, method, path, body, status, text in the message)
    ("malformed json", "POST", "/v1/chat/completions", b'{"messages": [', 400, "malformed JSON"),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("no messages", "POST", "/v1/chat/completions", b'{"m": 2}', 400, "'messages' is missing"),
    ("no text", "POST", "/v1/chat/completions",
     _body([{"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                _png_b64(shape_png())}}]), 400,
     "the question is missing"),
    ("no image", "POST", "/v1/chat/completions", _body([{"type": "text", "text": "hi"}]), 400,
     "the image is missing"),
    ("text only content", "POST", "/v1/chat/completions", _body("hi"), 400,
     "the image is missing"),
    ("not a data url", "POST", "/v1/chat/completions", _image("http://example.com/a.png"), 400,
     "is not a data URL"),
    ("broken base64", "POST", "/v1/chat/completions", _image("data:image/png;base64,@@x"), 400,
     "broken base64"),
    ("not an image", "POST", "/v1/chat/completions",
     _image("data:image/png;base64," + _png_b64(b"hello, not a png")), 400,
     "not a recognised image"),
    ("truncated image", "POST", "/v1/chat/completions",
     _image("data:image/png;base64," + _png_b64(shape_png()[:80])), 400, "image"),
    ("m zero", "POST", "/v1/chat/completions", _body(m=0), 400, "m=0 is out of range"),
    ("m above M", "POST", "/v1/chat/completions", _body(m=10), 400, "1 <= m <= M=9"),
    ("m float", "POST", "/v1/chat/completions", _body(m=2.5), 400, "m must be an integer"),
    ("m string", "POST", "/v1/chat/completions", _body(m="3"), 400, "m must be an integer"),
    ("two choices", "POST", "/v1/chat/completions", _body(m=2, flops_budget=1e9), 400,
     "at most one of m, flops_budget, latency_budget_ms; got m and flops_budget"),
    ("budget too small", "POST", "/v1/chat/completions", _body(flops_budget=1000), 400,
     "FLOPs budget 1000 is below"),
    ("negative budget", "POST", "/v1/chat/completions", _body(flops_budget=-1), 400,
     "flops_budget=-1 must be > 0"),
    ("latency without table", "POST", "/v1/chat/completions", _body(latency_budget_ms=50), 400,
     "latency.py"),
    ("prompt too long", "POST", "/v1/chat/completions",
     _body([{"type": "text", "text": "what colour is the circle " * 20},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                               _png_b64(shape_png())}}]), 400,
     "--max_prompt_tokens=40"),
    ("max_tokens", "POST", "/v1/chat/completions", _body(max_tokens=99), 400,
     "max_tokens=99 is out of range: 1 <= max_tokens <= 8"),
    ("unknown field", "POST", "/v1/chat/completions", _body(stream=True), 400,
     "unsupported field 'stream'"),
    ("body too large", "POST", "/v1/chat/completions", b"{" + b" " * 300_000 + b"}", 413,
     "more than this server's limit of 262144 bytes"),
    ("unknown path", "GET", "/v2/models", None, 404, "no such path '/v2/models'"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405,
     "GET /v1/chat/completions is not allowed; use POST"),
    ("post health", "POST", "/health", b"{}", 405, "use GET"),
]


def test_bad_requests_get_4xx_naming_the_culprit(served):
  _, before = request(served.url, "GET", "/metrics")
  failures = []
  for name, method, path, body, status, text in BAD:
    got, out = request(served.url, method, path, body, {"Content-Type": "application/json"})
    message = out["error"]["message"] if isinstance(out, dict) and "error" in out else out
    if got != status or text not in message:
      failures.append(f"{name}: {got} {message!r}, wanted {status} with {text!r}")
    elif isinstance(out, dict):
      assert out["error"]["type"] == "invalid_request_error", (name, out)
  assert not failures, "\n".join(failures)
  status, out = chat(served.url, m=2)  # Still serving.
  assert status == 200 and out["usage"]["visual_tokens"] == 2, out
  _, after = request(served.url, "GET", "/metrics")
  grew = {k: after["http"].get(k, 0) - before["http"].get(k, 0) for k in after["http"]}
  wanted = {s: sum(b[4] == s for b in BAD) for s in (400, 404, 405, 413)}
  assert {s: grew.get(str(s), 0) for s in wanted} == wanted, (grew, wanted)
  assert after["requests"] - before["requests"] == 1  # Only the good one reached the engine.


def test_concurrent_mixed_m_are_batched_and_answered(served):
  rng = np.random.default_rng(0)
  pngs = [shape_png(), shape_png((30, 160, 40), (60, 72), (8, 20, 40, 52))]
  jobs = [(int(rng.integers(1, 10)), i % 2) for i in range(24)]
  alone = {(m, k): chat(served.url, pngs[k], m=m) for m, k in sorted(set(jobs))}
  _, before = request(served.url, "GET", "/metrics")
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    outs = list(pool.map(lambda j: chat(served.url, pngs[j[1]], m=j[0]), jobs))
  _, after = request(served.url, "GET", "/metrics")
  for (m, k), (status, out) in zip(jobs, outs):
    assert status == 200, out
    assert out["usage"]["visual_tokens"] == m
    assert out["usage"]["bucket"] in BUCKETS and out["usage"]["bucket"] >= m  # May ride along.
    # Batching changes nothing: the answer alone equals the answer in a batch.
    assert out["choices"][0]["message"]["content"] == alone[m, k][1]["choices"][0][
        "message"]["content"], (m, k)
  assert after["requests"] - before["requests"] == len(jobs)
  sizes = {int(k): v - before["batch_size_counts"].get(k, 0)
           for k, v in after["batch_size_counts"].items()}
  assert sum(n * v for n, v in sizes.items()) == len(jobs), sizes
  assert max(n for n, v in sizes.items() if v) > 1, sizes
  assert max(out["usage"]["batch_size"] for _, out in outs) > 1
  assert after["batches"] - before["batches"] < len(jobs)
  assert after["http"]["200"] >= len(jobs) + len(alone)


def test_page_is_served(served):
  status, html = request(served.url, "GET", "/")
  assert status == 200 and "{{" not in html
  assert 'data-big-m="9"' in html and 'id="compare"' in html and "http://" not in html


def test_sigterm_stops_cleanly(served):
  code = served.stop(signal.SIGTERM, timeout=60)
  assert code == 0, served.output()
  assert served.lines[-2:] == ["stopping", "stopped"], served.output()


# ---------------------------------------------------------------------------
# The HTTP layer alone, over a fake engine.

class FakeEngine:
  def __init__(self, fail=None):
    self.fail, self.calls = fail, 0

  def submit(self, image, prompt, m, max_new_tokens=None):
    self.calls += 1
    if self.fail == "submit":
      raise KeyError("boom")
    future = concurrent.futures.Future()
    if self.fail == "run":
      future.set_exception(RuntimeError("the device fell over"))
    else:
      future.set_result(type("R", (), dict(
          text=f"fake m={m}", m=m, bucket=m, new_tokens=2, prompt_tokens=len(prompt) + m - 1,
          queue_s=0.001, compute_s=0.01, batch_size=1, finish_reason="stop"))())
    return future

  def metrics(self):
    return {"requests": self.calls}


def test_dry_run_prints_the_largest_bucket_memory_and_stops(workdir):
  """--dry_run: the memory of the largest bucket's program, then exit 0 without loading
  weights or listening; a plan that cannot fit stops the server the same way, before
  any weight (the 7B on a small host: docs/2026-12-06-serving.md)."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "serve.py"), "--config=configs/tiny.py",
       f"--workdir={workdir}", "--config.run_stages=1", "--port=0", "--buckets=1,4",
       "--batch_size=2", f"--max_new_tokens={MAX_NEW}", "--dry_run"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "memory of a generation run at m=9, batch 2," in out.stderr, out.stderr[-3000:]
  assert f"up to {MAX_NEW} new tokens" in out.stderr
  assert "listening:" not in out.stdout and "loading" not in out.stdout, out.stdout


def test_handler_errors_are_json_and_the_server_survives(workdir):
  cfg = ModelConfig.from_config(tiny.get_config().model)
  tok = tokenizer_lib.Tokenizer.load(
      os.path.join(workdir, "data", "mqt_synthetic_tokenizer", "tokenizer.model"))
  app = server_lib.App(tokenizer=tok, template="qa", model_cfg=cfg, max_new_tokens=4,
                       max_prompt_tokens=64, default_m=9, max_body_bytes=4096,
                       table_problem="no latency table at /x/latency.json")
  srv = server_lib.start(app)
  try:
    assert request(srv.url, "GET", "/health")[0] == 503
    engine = FakeEngine()
    app.set_engine(engine, (1, 9), 1.5)
    assert request(srv.url, "GET", "/health") == (200, {"status": "ok", "buckets": [1, 9],
                                                       "compile_s": 1.5, "M": 9})
    status, out = chat(srv.url, m=3)
    assert status == 200 and out["choices"][0]["message"]["content"] == "fake m=3", out
    status, out = chat(srv.url, latency_budget_ms=9)
    assert status == 400 and "no latency table at /x/latency.json" in out["error"]["message"]
    status, out = request(srv.url, "POST", "/v1/chat/completions", b"x" * 5000)
    assert status == 413 and "limit of 4096 bytes" in out["error"]["message"], out
    for fail, text in (("submit", "KeyError"), ("run", "the device fell over")):
      engine.fail = fail
      status, out = chat(srv.url, m=3)
      assert status == 500 and text in out["error"]["message"], out
      assert out["error"]["type"] == "server_error"
    engine.fail = None
    assert chat(srv.url, m=5)[0] == 200
    assert request(srv.url, "GET", "/metrics")[1]["http"] == {
        "200": 3, "400": 1, "413": 1, "500": 2, "503": 1}
  finally:
    srv.shutdown()
    srv.server_close()
