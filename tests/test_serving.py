"""mqt/serving.py: bucketed generation at mixed m, and the request batcher.

One module fixture: the tiny config's model with random weights (scaled x3: sharp
logits, no near-ties in the greedy argmax), a small SentencePiece tokenizer, and a
BucketedGenerator over the default buckets (1, 2, 4, 8, 9) whose construction is counted
in XLA compilations.
"""
import concurrent.futures
import threading
import time
import types

import jax
import numpy as np
import pytest

from bench.common import count_compiles
from configs import tiny
from data import synthetic as S
from data import tokenizer as tokenizer_lib
from mqt import generate as gen
from mqt import inference
from mqt import params as params_lib
from mqt import serving
from mqt import sharding as shard_lib
from mqt.model import MQTLLaVA, ModelConfig

BATCH, TEXT_LEN, NEW = 4, 40, 6
QUESTIONS = ("What color is the circle?", "How many shapes are there?",
             "Where is the red square?", "Is the triangle big?", "Is it small?")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  config = tiny.get_config()
  cfg = ModelConfig.from_config(config.model)
  tok = tokenizer_lib.Tokenizer.load(tokenizer_lib.train_tokenizer(
      S.corpus_text(0, 50), str(tmp_path_factory.mktemp("tok") / "tokenizer.model"),
      vocab_size=400))
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  rules = tuple(config.sharding.logical_axis_rules)
  model = MQTLLaVA(cfg)
  with jax.set_mesh(mesh):
    params = params_lib.random_params(0, cfg, model, params_lib.param_shardings(cfg, mesh, rules))
    params = jax.tree.map(lambda x: x * 3.0, params)
  loaded = inference.Loaded(cfg, model, params, tok, mesh, "random", config.eval.data.template,
                            rules)
  sampling = gen.SamplingConfig(max_new_tokens=NEW, eos_id=tok.eos_id, pad_id=max(tok.pad_id, 0))
  with count_compiles() as compiles:
    generator = serving.BucketedGenerator(loaded, None, BATCH, TEXT_LEN, sampling)
  rng = np.random.default_rng(0)
  size = cfg.vision.image_size
  images = rng.normal(size=(12, size, size, 3)).astype(np.float32)
  prompts = [inference.encode_prompt(q, tok, True, loaded.template) for q in QUESTIONS]
  return types.SimpleNamespace(loaded=loaded, sampling=sampling, generator=generator,
                               construction_compiles=compiles(), images=images, prompts=prompts)


def _rows(served, ms, start=0):
  """Rows start.. with the given m: (images, prompts) cycling through the fixture's."""
  idx = [(start + i) % len(served.images) for i in range(len(ms))]
  return ([served.images[i] for i in idx],
          [served.prompts[i % len(served.prompts)] for i in idx])


# Mixed within and across buckets; every m in 1..9 occurs, every bucket runs.
MIXES = ([1], [2, 1], [3, 1, 4, 2], [5, 8, 3, 7], [9, 6, 1], [6, 9, 9, 2])


def _reference(served, answerers, m, images, prompts):
  """Answerer at m alone (batch BATCH, rows padded with copies): (token rows, texts)."""
  if m not in answerers:
    answerers[m] = inference.Answerer(served.loaded, m, BATCH, TEXT_LEN, served.sampling)
  answerer = answerers[m]
  n = len(prompts)
  pad = BATCH - n
  images = np.stack(list(images) + [images[0]] * pad)
  ids, mask = inference.pad_prompts(list(prompts) + [prompts[0]] * pad, TEXT_LEN,
                                    served.sampling.pad_id)
  with served.loaded.context():
    program = answerer._generate  # pylint: disable=protected-access  (its token ids)
    out = jax.device_get(program(served.loaded.params, images, ids, mask, np.int32(0)))
  eos = served.sampling.eos_id
  tokens = [tuple(int(t) for t in out["tokens"][r, :int(out["num_tokens"][r])] if int(t) != eos)
            for r in range(n)]
  return tokens, answerer(images, ids, mask, rows=n)


def test_mixed_m_rows_answer_as_each_m_alone(served):
  g = served.generator
  assert g.buckets == (1, 2, 4, 8, 9) and g.ready and g.compile_s > 0
  got = {}  # m -> [(row index in its batch, Result, image, prompt)]
  for k, ms in enumerate(MIXES):
    images, prompts = _rows(served, ms, start=3 * k)
    results = g.run(np.stack(images), prompts, ms)
    assert [r.bucket for r in results] == [g.bucket_of(max(ms))] * len(ms)
    assert [r.m for r in results] == ms and all(r.batch_size == len(ms) for r in results)
    for r, image, prompt in zip(results, images, prompts):
      assert r.new_tokens == len(r.tokens) + (r.finish_reason == "stop")
      assert r.prompt_tokens == len(prompt) + r.m - 1
      got.setdefault(r.m, []).append((r, image, prompt))
  assert sorted(got) == list(range(1, 10))
  differs, answerers = 0, {}
  for m, rows in sorted(got.items()):
    tokens, texts = _reference(served, answerers, m, [x[1] for x in rows], [x[2] for x in rows])
    assert [r.tokens for r, _, _ in rows] == tokens, f"m={m}"
    assert [r.text for r, _, _ in rows] == texts, f"m={m}"
    # Control: the same rows at another m answer differently (the comparison can fail).
    other, _ = _reference(served, answerers, m % 9 + 1, [x[1] for x in rows], [x[2] for x in rows])
    differs += other != tokens
  assert differs >= 5, f"answers at m and m+1 differ for only {differs} of 9 m"


def test_any_mix_of_m_compiles_one_program_per_bucket(served):
  g = served.generator
  assert served.construction_compiles == len(g.buckets)
  rng = np.random.default_rng(1)
  seen = set()
  with count_compiles() as compiles:
    for k in range(15):
      ms = [int(x) for x in rng.integers(1, g.big_m + 1, size=int(rng.integers(1, BATCH + 1)))]
      images, prompts = _rows(served, ms, start=k)
      seen.add(g.run(np.stack(images), prompts, ms)[0].bucket)
  assert compiles() == 0
  assert len(seen) >= 3, seen  # Several programs ran.


def test_token_limit_truncates_the_answer(served):
  g = served.generator
  images, prompts = _rows(served, [4, 4])
  full = g.run(np.stack(images), prompts, [4, 4])
  cut = g.run(np.stack(images), prompts, [4, 4], max_new_tokens=[2, NEW])
  assert cut[0].tokens == full[0].tokens[:2] and cut[0].new_tokens == 2
  assert cut[0].finish_reason == "length"
  assert cut[1].tokens == full[1].tokens and cut[1].new_tokens == full[1].new_tokens
  with pytest.raises(ValueError, match=r"max_new_tokens=7 is out of range: 1..6"):
    g.run(np.stack(images), prompts, [4, 4], max_new_tokens=[7, 1])


def test_generator_rejects_bad_input(served):
  g = served.generator
  image, prompt = served.images[:1], served.prompts[:1]
  for m, match in ((0, "m=0 is out of range: 1 <= m <= M=9"), (10, "m=10 is out of range"),
                   (2.0, "m must be an integer, got 2.0")):
    with pytest.raises(ValueError, match=match):
      g.run(image, prompt, [m])
  with pytest.raises(ValueError, match="the prompt has 41 tokens, more than the 40"):
    g.run(image, [[1] * 41], [1])
  with pytest.raises(ValueError, match="a batch holds 1..4 rows, got 5"):
    g.run(served.images[:5], served.prompts[:5], [1] * 5)
  with pytest.raises(ValueError, match="prompt token 1024 is outside the vocabulary 0..1023"):
    g.run(image, [[1, 1024]], [1])
  with pytest.raises(ValueError, match=r"the image has shape \(8, 8, 3\)"):
    g.run(np.zeros((1, 8, 8, 3), np.float32), prompt, [1])
  custom = serving.BucketedGenerator(served.loaded, (3, 5), BATCH, TEXT_LEN, served.sampling,
                                     compile=False)
  assert custom.buckets == (3, 5, 9) and not custom.ready and custom.compile_s == 0
  assert [custom.bucket_of(m) for m in (1, 3, 4, 6, 9)] == [3, 3, 5, 9, 9]
  with pytest.raises(RuntimeError, match="still compiling"):
    custom.run(image, prompt, [1])
  with pytest.raises(ValueError, match="bucket size 10 is out of range"):
    serving.BucketedGenerator(served.loaded, (10,), BATCH, TEXT_LEN, served.sampling,
                              compile=False)


def test_batcher_batches_concurrent_requests_with_direct_answers(served):
  g = served.generator
  ms = [1, 7, 2, 9, 3, 5, 4, 8]
  images, prompts = _rows(served, ms, start=5)
  direct = [g.run(images[i][None], [prompts[i]], [ms[i]])[0] for i in range(len(ms))]
  barrier = threading.Barrier(len(ms))
  futures = [None] * len(ms)
  with serving.Batcher(g, max_wait_ms=500) as batcher:
    def client(i):
      barrier.wait()
      futures[i] = batcher.submit(images[i], prompts[i], ms[i])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ms))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    results = [f.result(timeout=120) for f in futures]
    metrics = batcher.metrics()
  for i, (r, d) in enumerate(zip(results, direct)):
    assert (r.tokens, r.text, r.m) == (d.tokens, d.text, d.m), f"request {i}"
    assert r.bucket >= g.bucket_of(ms[i]) and r.queue_s >= 0 and r.compute_s > 0
  sizes = metrics["batch_size_counts"]
  assert max(sizes) > 1, metrics
  assert metrics["requests"] == len(ms) == sum(k * n for k, n in sizes.items())
  assert metrics["batches"] == sum(sizes.values()) == sum(metrics["bucket_counts"].values())
  assert metrics["new_tokens"] == sum(r.new_tokens for r in results)
  assert metrics["queue_length"] == 0 and metrics["tokens_per_s"] > 0
  assert metrics["mean_batch_size"] == pytest.approx(len(ms) / metrics["batches"])


def test_batcher_rejects_bad_requests_at_submit(served):
  image, prompt = served.images[0], served.prompts[0]
  with serving.Batcher(served.generator) as batcher:
    with pytest.raises(ValueError, match="m=10 is out of range"):
      batcher.submit(image, prompt, 10)
    with pytest.raises(ValueError, match="m=0 is out of range"):
      batcher.submit(image, prompt, 0)
    with pytest.raises(ValueError, match="the prompt has 50 tokens, more than the 40"):
      batcher.submit(image, [1] * 50, 2)
    with pytest.raises(ValueError, match="the prompt is empty"):
      batcher.submit(image, [], 2)
    with pytest.raises(ValueError, match="the image has shape"):
      batcher.submit(image[:10], prompt, 2)
    assert batcher.metrics()["requests"] == 0
  with pytest.raises(RuntimeError, match="closed"):
    batcher.submit(image, prompt, 2)


class _FakeGenerator:
  """Records the batches it runs; a batch holding m = 5 fails."""
  batch_size = 3
  buckets = (1, 4, 9)

  def __init__(self):
    self.calls = []

  def bucket_of(self, m):
    return next(b for b in self.buckets if b >= serving.matryoshka.validate_m(m, 9))

  def check_prompt(self, prompt):
    return list(prompt)

  def check_image(self, image):
    return image

  def check_limit(self, limit):
    return limit or 4

  def run_checked(self, images, prompts, ms, buckets, limits):
    del images, limits
    self.calls.append(list(ms))
    if 5 in ms:
      raise RuntimeError("boom")
    bucket = max(buckets)
    return [serving.Result(str(p[0]), m, bucket, 2, 1, 0.0, 0.01, len(ms)) for p, m in
            zip(prompts, ms)]


def test_batcher_takes_the_oldest_bucket_and_survives_a_failing_batch():
  fake = _FakeGenerator()
  with serving.Batcher(fake, max_wait_ms=300) as batcher:
    t0 = time.perf_counter()
    image = np.arange(3.0)  # Requests hold arrays: taking them out must not compare those.
    first = [batcher.submit(image + i, [i], m) for i, m in enumerate([1, 9, 2, 1, 1, 1])]
    assert time.perf_counter() - t0 < 0.1  # All queued inside one wait.
    assert [f.result(timeout=10).text for f in first] == ["0", "1", "2", "3", "4", "5"]
    # The oldest (bucket 1) takes bucket-1 requests only, 3 at most; then the oldest is
    # bucket 9's, whose batch takes the bucket-4 and the last bucket-1 request along.
    assert fake.calls == [[1, 1, 1], [9, 2, 1]]
    failing = [batcher.submit(image, [i], m) for i, m in enumerate([5, 4])]
    for f in failing:
      with pytest.raises(RuntimeError, match="boom"):
        f.result(timeout=10)
    after = batcher.submit(image, [7], 3)
    assert after.result(timeout=10).text == "7"  # The worker kept serving.
    metrics = batcher.metrics()
  assert metrics["failed_batches"] == 1 and metrics["batches"] == 3
  assert metrics["batch_size_counts"] == {1: 1, 3: 2}
  assert metrics["bucket_counts"] == {1: 1, 4: 1, 9: 1}
  assert isinstance(first[0], concurrent.futures.Future)
