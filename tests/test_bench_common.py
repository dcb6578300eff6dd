"""bench/common.py: the FLOP convention against a hand count, the busy-machine rule on
made-up snapshots, and the peak as the fastest measured rate. No timing is asserted."""
import pytest

from bench import common
from mqt import flops
from mqt.decoder import LlamaConfig
from mqt.model import ModelConfig
from mqt.query_transformer import QueryConfig
from mqt.vision import VisionConfig

# 8 px images in 4 px patches (P = 4, 5 tokens with the class token), a 2-block tower
# of which 1 runs (select_layer -2), M = 4 latents, a 1-layer LLM of width 16.
CFG = ModelConfig(
    vision=VisionConfig(image_size=8, patch_size=4, width=8, depth=2, heads=2, mlp_dim=16),
    query=QueryConfig(variant="official", num_queries=4, width=8, heads=2, out_dim=16),
    llm=LlamaConfig(vocab_size=32, width=16, depth=1, heads=2, kv_heads=1, head_dim=8,
                    mlp_dim=24))

# Per image, by hand (multiply-add = 2):
#   vision: conv 2*4*(4*4*3)*8 = 3072; one block over 5 tokens: q/k/v/o 4*2*5*8*8 = 2560,
#           attention 4*5*5*2*4 = 800, MLP 2*2*5*8*16 = 2560.
VISION = 3072 + 2560 + 800 + 2560
#   query at n latents: once per call the position table's resize 2*2*2*2*8 * 2 = 256,
#           q_proj 2*n*8*8 and k_proj 2*4*8*8 = 512; per image v_proj 512, attention
#           4*n*4*2*4, out_proj 2*n*8*8, proj 2*n*8*16.
def query(n, batch):
  return 256 + 128 * n + 512 + batch * (512 + 128 * n + 128 * n + 256 * n), batch * 128 * n
#   LLM per token: q 2*16*16 = 512, k and v 2*2*16*8 = 512, o 512, MLP 3*2*16*24 = 2304;
#   the head 2*16*32 = 1024 per row it runs at; causal attention 4*S*S*2*8 / 2 = 32 S^2.
LLM_TOKEN, HEAD = 512 + 512 + 512 + 2304, 1024


def test_training_flops_match_a_hand_count():
  t, m, b = 5, 2, 3
  s = t + m - 1
  q_all, _ = query(m, b)
  llm = b * (s * LLM_TOKEN + (s - 1) * HEAD) + b * 32 * s * s
  got = common.model_flops(CFG, t, m, b, train=("query", "llm"))
  assert got["seq_len"] == s
  assert got["vision"] == b * VISION  # Frozen and first: forward only.
  assert got["query"] == 3 * q_all
  assert got["llm"] == 3 * llm
  assert got["total"] == b * VISION + 3 * q_all + 3 * llm


def test_a_frozen_part_after_a_trainable_one_counts_its_activation_gradient():
  t, m, b = 5, 2, 3
  s = t + m - 1
  dense = b * (s * LLM_TOKEN + (s - 1) * HEAD)
  got = common.model_flops(CFG, t, m, b, train=("query",))
  assert got["llm"] == 2 * dense + 3 * b * 32 * s * s


def test_forward_only_and_padded():
  t, m, b = 5, 2, 3
  s = t + m - 1
  q_all, _ = query(m, b)
  got = common.model_flops(CFG, t, m, b)
  assert got["total"] == b * VISION + q_all + b * (s * LLM_TOKEN + HEAD) + b * 32 * s * s
  padded = common.model_flops(CFG, t, m, b, padded=True)
  assert padded == common.model_flops(CFG, t, CFG.query.num_queries, b)
  assert padded["seq_len"] == t + CFG.query.num_queries - 1


def test_forward_equals_mqt_flops_but_for_the_attention_the_prefill_computes():
  """mqt.flops counts what the compiled prefill runs (tests/test_flops.py holds it to
  XLA's dot FLOPs): each of the S prompt slots attends over the whole cache of
  S + max_new slots. The model FLOPs keep the S^2 / 2 causal pairs instead."""
  t, m, b, new = 7, 3, 2, 5
  s = t + m - 1
  c = CFG.llm
  computed = flops.flops_per_m(CFG, t, m, new, batch=b)["prefill"]
  causal_gap = b * c.depth * 4 * s * c.heads * c.head_dim * (s + new) - b * 32 * s * s
  assert common.model_flops(CFG, t, m, b)["total"] == computed - causal_gap


def test_every_part_training_and_bad_parts():
  got = common.model_flops(CFG, 5, 4, 1, train=common.PARTS)
  assert got["vision"] == 3 * VISION
  with pytest.raises(ValueError, match="unknown parts"):
    common.model_flops(CFG, 5, 4, 1, train=("tower",))
  with pytest.raises(ValueError, match="out of range"):
    common.model_flops(CFG, 5, 5, 1)


def test_trainable_parts_and_counts():
  labels = {"vision": {"w": "frozen"}, "query": {"a": "g0", "b": "g0"},
            "llm": {"x": "g1"}}
  assert common.trainable_parts(labels) == ("query", "llm")
  labels["vision"]["w"] = "g2"
  assert common.trainable_parts(labels) == common.PARTS
  assert common.trainable_parts(labels, train_vision=False) == ("query", "llm")
  labels["llm"]["y"] = "frozen"
  with pytest.raises(ValueError, match="only some of llm"):
    common.trainable_parts(labels)

  class Leaf:
    def __init__(self, *shape):
      self.shape = shape
  params = {"vision": {"w": Leaf(3, 4)}, "query": {"a": Leaf(5), "b": Leaf(2, 2)}}
  labels = {"vision": {"w": "frozen"}, "query": {"a": "g0", "b": "g0"}}
  assert common.param_counts(params, labels) == {"total": 21, "trainable": 9}


def _snap(load1, ref_s, wall=0.0, own=0.0, busy=0.0, total=0.0):
  return {"load1": load1, "ref_s": ref_s, "wall": wall, "own_cpu_s": own, "cpu_busy_s": busy,
          "cpu_total_s": total}


def test_busy_flag_rules():
  quiet = common.busy_reasons(_snap(0.2, 0.010), _snap(0.3, 0.0105), cores=2)
  assert quiet == []
  assert "before" in common.busy_reasons(_snap(1.6, 0.010), _snap(0.3, 0.010), 2)[0]
  assert "reference matmul" in common.busy_reasons(_snap(0.2, 0.010), _snap(0.2, 0.0112), 2)[0]
  assert "reference matmul" in common.busy_reasons(_snap(0.2, 0.010), _snap(0.2, 0.0085), 2)[0]
  # 120 s using both cores: the load average of 1.9 after is this process's own.
  own = common.busy_reasons(_snap(0.1, 0.01, 0, 0, 0, 0), _snap(1.9, 0.01, 120, 240, 240, 240),
                            cores=2)
  assert own == []
  # The same load with this process idle: someone else's.
  other = common.busy_reasons(_snap(0.1, 0.01, 0, 0, 0, 0), _snap(1.9, 0.01, 120, 0, 0, 240),
                              cores=2)
  assert any("after" in r for r in other)
  # Other processes took a third of the CPU time.
  share = common.busy_reasons(_snap(0.1, 0.01, 0, 0, 0, 0), _snap(0.1, 0.01, 60, 40, 80, 120),
                              cores=2)
  assert share == ["other processes used 33% of the CPU"]


def test_peak_is_the_fastest_rate_and_is_named():
  rates = [{"backend": "jax", "shape": [64, 128, 256], "flops_per_s": 5e10},
           {"backend": "numpy", "shape": [2048, 2048, 2048], "flops_per_s": 9e10},
           {"backend": "jax", "shape": [2048, 2048, 2048], "flops_per_s": 8e10}]
  peak = common.pick_peak(rates)
  assert peak["flops_per_s"] == 9e10
  assert peak["label"] == "numpy 2048x2048x2048"
  assert "numpy 2048x2048x2048" in common.peak_line(peak)
  with pytest.raises(ValueError):
    common.pick_peak([])
