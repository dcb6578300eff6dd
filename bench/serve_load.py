r"""serve.py under load: batched concurrent serving against one request at a time.

  python -m bench.serve_load --workdir=/tmp/mqt_tiny --duration=60 --json_out=load.json

Starts serve.py (a subprocess, loopback, any free port) on the checkpoint of
--config / --workdir (default: the trained configs/tiny.py model), waits for
GET /health, sends one warm-up request per bucket, then:

  concurrent  --clients threads (32), each on its own keep-alive connection, send
              requests for --duration seconds: a seeded list of (image, question, m)
              with m uniform over 1..M, images and questions from the built-in
              held-out set under the workdir's data folder (PIL-drawn shapes where
              there is none). Every non-200 answer is a failure (there must be none).
              Meanwhile one more thread sends each kind of bad request over and over
              and checks that each gets its 4xx.
  sequential  the batched server stops and a second serve.py starts, built for one
              request at a time (--batch_size=1 --max_wait_ms=0: a batch-of-one program
              per bucket and no wait for company); one client sends the same request
              list, one request at a time, for --sequential_duration seconds.

Prints requests/s, p50 and p99 latency of both, their ratio (concurrent / sequential),
the server's batch sizes (GET /metrics), each bad kind with the statuses it got, and
the machine record (busy or quiet, bench/common.py). Exit status 1 when a request
failed or a bad request got anything but its 4xx.
"""
import base64
import collections
import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app
from absl import flags

from bench import common
from bench import serve_samples
from mqt import chat_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "serve.py's --config.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mqt_tiny", "serve.py's --workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "serve.py's --checkpoint.")
_DURATION = flags.DEFINE_float("duration", 60.0, "Seconds of concurrent load.")
_SEQ_DURATION = flags.DEFINE_float("sequential_duration", 30.0, "Seconds of one-at-a-time "
                                   "serving.")
_CLIENTS = flags.DEFINE_integer("clients", 32, "Concurrent client threads.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "serve.py's --batch_size.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 10.0, "serve.py's --max_wait_ms.")
_IMAGES = flags.DEFINE_integer("images", 8, "Distinct images (and questions) in the list.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the request list.")
_SERVE_ARGS = flags.DEFINE_list("serve_args", [], "More serve.py flags, e.g. "
                                "--serve_args=--buckets=1,4,9.")
_JSON = common.define_json_flag()


class ServeProcess:
  """serve.py as a subprocess on a free loopback port: `url`, stdout `lines`,
  `wait_ready()` (-> seconds from start to GET /health 200), `stop()` (SIGTERM)."""

  def __init__(self, args, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--port=0", *args]
    self.started = time.perf_counter()
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines, self.url = [], None
    listening = threading.Event()
    def read():
      for line in self.proc.stdout:
        self.lines.append(line.rstrip("\n"))
        if line.startswith("listening: "):
          self.url = line.split()[1]
          listening.set()
      listening.set()
    threading.Thread(target=read, daemon=True).start()
    if not listening.wait(300) or self.url is None:
      self.stop()
      raise SystemExit("serve.py did not start:\n" + "\n".join(self.lines[-40:]))

  def wait_ready(self, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
      if self.proc.poll() is not None:
        break
      if call(self.url, "GET", "/health")[0] == 200:
        return time.perf_counter() - self.started
      time.sleep(0.2)
    self.stop()
    raise SystemExit("serve.py never became ready:\n" + "\n".join(self.lines[-40:]))

  def stop(self) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    try:
      return self.proc.wait(60)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      return self.proc.wait()


def process_cpu_s(pid: int) -> float:
  """CPU seconds of a running process and its waited-for children (/proc; 0 elsewhere)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def call(url, method, path, body=None, conn=None, timeout=300):
  """One request -> (status, parsed JSON or None); `conn`: a kept-alive connection."""
  host, port = url.split("//")[1].split(":")
  own = conn is None
  conn = conn or http.client.HTTPConnection(host, int(port), timeout=timeout)
  try:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
  except (OSError, http.client.HTTPException):
    conn.close()
    return 0, None
  finally:
    if own:
      conn.close()
  try:
    return resp.status, json.loads(data)
  except ValueError:
    return resp.status, None


def bad_requests(png: bytes, big_m: int, max_body_bytes: int):
  """(kind, method, path, body, wanted status) of every bad request kind."""
  ok = lambda **f: chat_api.chat_body("What colour is the circle?", png, **f)
  image = lambda url: json.dumps({"messages": [{"role": "user", "content": [
      {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
                                 ).encode()
  return [
      ("malformed JSON", "POST", "/v1/chat/completions", b'{"messages": [', 400),
      ("no messages", "POST", "/v1/chat/completions", b'{"m": 1}', 400),
      ("no image", "POST", "/v1/chat/completions", json.dumps({"messages": [
          {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}).encode(), 400),
      ("non-data URL", "POST", "/v1/chat/completions", image("http://x/a.png"), 400),
      ("broken base64", "POST", "/v1/chat/completions", image("data:image/png;base64,@@"), 400),
      ("broken image", "POST", "/v1/chat/completions",
       image("data:image/png;base64," + base64.b64encode(png[:60]).decode()), 400),
      ("m out of range", "POST", "/v1/chat/completions", ok(m=big_m + 1), 400),
      ("m not an integer", "POST", "/v1/chat/completions", ok(m=1.5), 400),
      ("m and a budget", "POST", "/v1/chat/completions", ok(m=1, flops_budget=1e12), 400),
      ("budget too small", "POST", "/v1/chat/completions", ok(flops_budget=10.0), 400),
      ("prompt too long", "POST", "/v1/chat/completions",
       chat_api.chat_body("is it red " * 400, png), 400),
      ("body too large", "POST", "/v1/chat/completions", b" " * (max_body_bytes + 1), 413),
      ("unknown path", "GET", "/v1/nothing", None, 404),
      ("wrong method", "GET", "/v1/chat/completions", None, 405),
  ]


def percentiles(latencies):
  if not latencies:
    return float("nan"), float("nan")
  return (float(np.percentile(latencies, 50)) * 1e3, float(np.percentile(latencies, 99)) * 1e3)


def load(url: str, bodies, clients: int, duration: float):
  """clients threads send bodies (round robin over one shared counter) for `duration`
  seconds -> (latencies of the 200s, statuses Counter, seconds)."""
  lock, nxt = threading.Lock(), [0]
  latencies, statuses = [], collections.Counter()
  host, port = url.split("//")[1].split(":")
  stop_at = time.perf_counter() + duration
  def client():
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    mine, seen = [], collections.Counter()
    while time.perf_counter() < stop_at:
      with lock:
        body = bodies[nxt[0] % len(bodies)]
        nxt[0] += 1
      t0 = time.perf_counter()
      status, _ = call(url, "POST", "/v1/chat/completions", body, conn)
      if status == 0:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
      seen[status] += 1
      if status == 200:
        mine.append(time.perf_counter() - t0)
    conn.close()
    with lock:
      latencies.extend(mine)
      statuses.update(seen)
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for f in [pool.submit(client) for _ in range(clients)]:
      f.result()
  return latencies, statuses, time.perf_counter() - t0


def warm_up(server: ServeProcess, buckets, samples) -> None:
  """One request per bucket, so every program has run once before anything is timed."""
  for b in buckets:
    status, out = call(server.url, "POST", "/v1/chat/completions",
                       chat_api.chat_body(samples[0][1], samples[0][0], m=b))
    if status != 200:
      server.stop()
      raise SystemExit(f"warm-up request at m={b} failed: {status} {out}")


def main(argv):
  del argv
  samples, source = serve_samples.builtin_samples(_WORKDIR.value, _IMAGES.value)
  common_args = [f"--config={_CONFIG.value}", f"--workdir={_WORKDIR.value}", "--max_body_mb=1",
                 *_SERVE_ARGS.value]
  if _CHECKPOINT.value:
    common_args.append(f"--checkpoint={_CHECKPOINT.value}")
  server = ServeProcess(common_args + [f"--batch_size={_BATCH_SIZE.value}",
                                       f"--max_wait_ms={_MAX_WAIT_MS.value}"])
  ready_s = server.wait_ready()
  _, health = call(server.url, "GET", "/health")
  big_m, buckets = health["M"], health["buckets"]
  print(f"serve.py ready in {ready_s:.1f} s at {server.url}: M={big_m}, buckets {buckets}; "
        f"{len(samples)} images and questions from the {source}", flush=True)
  rng = np.random.default_rng(_SEED.value)
  plan = [(int(rng.integers(len(samples))), int(rng.integers(1, big_m + 1)))
          for _ in range(4096)]
  bodies = [chat_api.chat_body(samples[i][1], samples[i][0], m=m) for i, m in plan]
  warm_up(server, buckets, samples)
  # The server's CPU counts as this benchmark's own, not as another process's.
  watch = common.MachineWatch().start()
  watch.before["own_cpu_s"] += process_cpu_s(server.proc.pid)
  bad = bad_requests(samples[0][0], big_m, 1 << 20)
  bad_seen = {kind: collections.Counter() for kind, *_ in bad}
  stop_bad = threading.Event()
  def bad_client():
    while not stop_bad.is_set():
      for kind, method, path, body, _ in bad:
        bad_seen[kind][call(server.url, method, path, body)[0]] += 1
      stop_bad.wait(0.2)
  bad_thread = threading.Thread(target=bad_client, daemon=True)
  _, before = call(server.url, "GET", "/metrics")
  bad_thread.start()
  conc_lat, conc_status, conc_s = load(server.url, bodies, _CLIENTS.value, _DURATION.value)
  stop_bad.set()
  bad_thread.join()
  _, after = call(server.url, "GET", "/metrics")
  watch.before["own_cpu_s"] -= process_cpu_s(server.proc.pid)  # Counted, then gone.
  code = server.stop()
  print("one at a time: a second serve.py with --batch_size=1 --max_wait_ms=0", flush=True)
  single = ServeProcess(common_args + ["--batch_size=1", "--max_wait_ms=0"])
  single.wait_ready()
  warm_up(single, buckets, samples)
  seq_lat, seq_status, seq_s = load(single.url, bodies, 1, _SEQ_DURATION.value)
  watch.after = common.snapshot()
  watch.after["own_cpu_s"] += process_cpu_s(single.proc.pid)  # Started inside the window.
  record = watch.record
  code = max(code, single.stop())

  conc_ok, seq_ok = len(conc_lat), len(seq_lat)
  failures = sum(v for k, v in conc_status.items() if k != 200) + \
      sum(v for k, v in seq_status.items() if k != 200)
  conc_rps, seq_rps = conc_ok / conc_s, seq_ok / seq_s
  sizes = {int(k): v - before["batch_size_counts"].get(k, 0)
           for k, v in after["batch_size_counts"].items()}
  rows = sum(n * v for n, v in sizes.items())
  mean_batch = rows / max(sum(sizes.values()), 1)
  (c50, c99), (s50, s99) = percentiles(conc_lat), percentiles(seq_lat)
  print("\n| serving | clients | seconds | requests | failures | requests/s | p50 ms | p99 ms |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| concurrent | {_CLIENTS.value} | {conc_s:.1f} | {conc_ok} | "
        f"{sum(v for k, v in conc_status.items() if k != 200)} | {conc_rps:.2f} | {c50:.0f} | "
        f"{c99:.0f} |")
  print(f"| one at a time | 1 | {seq_s:.1f} | {seq_ok} | "
        f"{sum(v for k, v in seq_status.items() if k != 200)} | {seq_rps:.2f} | {s50:.0f} | "
        f"{s99:.0f} |")
  ratio = conc_rps / seq_rps if seq_rps else float("nan")
  print(f"\nconcurrent / one at a time: {ratio:.2f}x requests/s; mean batch {mean_batch:.2f} "
        f"rows (batch sizes {dict(sorted(sizes.items()))}); batch_size {_BATCH_SIZE.value}, "
        f"max_wait_ms {_MAX_WAIT_MS.value:g} against batch_size 1, max_wait_ms 0")
  bad_ok = True
  print("\nbad requests sent during the concurrent load (kind: statuses):")
  for kind, _, _, _, wanted in bad:
    seen = dict(bad_seen[kind])
    good = bool(seen) and set(seen) == {wanted}
    bad_ok &= good
    print(f"  {kind}: {seen} {'ok' if good else f'WANTED only {wanted}'}")
  print(f"serve.py exit status after SIGTERM (the worse of the two): {code}")
  common.finish(record, _JSON(), ready_s=ready_s, source=source, buckets=buckets, big_m=big_m,
                concurrent=dict(clients=_CLIENTS.value, seconds=conc_s, requests=conc_ok,
                                statuses=dict(conc_status), requests_per_s=conc_rps,
                                p50_ms=c50, p99_ms=c99, batch_size_counts=sizes,
                                mean_batch_size=mean_batch),
                sequential=dict(seconds=seq_s, requests=seq_ok, statuses=dict(seq_status),
                                requests_per_s=seq_rps, p50_ms=s50, p99_ms=s99),
                ratio=ratio, failures=failures,
                bad_requests={k: dict(v) for k, v in bad_seen.items()}, exit_status=code)
  if failures or not bad_ok or code != 0:
    print(f"FAILED: {failures} failed requests, bad requests "
          f"{'ok' if bad_ok else 'not all refused with their 4xx'}, exit status {code}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
