"""Streaming import: shardings and dtype, shapes from the checkpoint, memory refusal,
stage 1's random leaves, and the README's import example run as written."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bench import full_checkpoint
from configs import mqt_llava
from mqt import convert
from mqt import memory as mem_lib
from mqt import sharding as shard_lib
from mqt.checkpoint_io import CheckpointError, TensorSource
from mqt.decoder import LlamaConfig
from mqt.model import MQTLLaVA, ModelConfig, text_slots
from mqt.query_transformer import QueryConfig
from mqt.vision import VisionConfig
from mqt import params as params_lib
from tests import torch_reference as ref

IMG = ref.IMAGE
M = 36  # The README's example runs at m=36.
README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def _hf_json(cfg) -> dict:
  return json.loads(cfg.to_json_string())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A tiny MQT-LLaVA in the released layout (tower included, config.json with LLaMA and
  LLaVA fields) whose unrecorded fields are the 7B config's: 16 heads in CLIP and in
  the resampler. -> (torch model, folder)."""
  clip, clip_cfg = ref.tiny_clip(seed=4, heads=16)
  llm, llm_cfg = ref.tiny_llama(seed=5)
  query = ref.randomize_(ref.RefQueryTransformer(clip_cfg.hidden_size, 16, llm_cfg.hidden_size,
                                                 M), seed=6)
  state = ref.released_state(clip, query, llm)
  path = ref.save_safetensors(state, str(tmp_path_factory.mktemp("released")), shards=3)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**_hf_json(llm_cfg), "architectures": ["LlavaLlamaForCausalLM"],
               "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
               "mm_hidden_size": clip_cfg.hidden_size}, f)
  return ref.RefMQTLLaVA(clip, query, llm).eval(), path


def _inputs(vocab, size):
  """Three prompts (placeholder at different places) -> numpy inputs and torch lists."""
  rng = np.random.default_rng(0)
  ids = []
  for p, n in [(1, 6), (3, 9), (2, 4)]:
    x = rng.integers(1, vocab, size=n)
    x[p] = IMG
    ids.append(x)
  t = max(len(x) for x in ids)
  input_ids = np.zeros((3, t), np.int32)
  text_mask = np.zeros((3, t), bool)
  for b, x in enumerate(ids):
    input_ids[b, :len(x)], text_mask[b, :len(x)] = x, True
  pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
  return ids, input_ids, text_mask, pixels


def _max_error(logits, torch_model, ids, input_ids, text_mask, pixels, m):
  """Max abs difference of our logits and the reference's at every text position."""
  with torch.no_grad():
    want, _, offsets = torch_model(pixels, [torch.tensor(x) for x in ids],
                                   [torch.tensor(x) for x in ids], m)
  want = ref.to_np(want)
  slots = np.asarray(text_slots(input_ids, text_mask, m, IMG))
  errs = [np.abs(np.asarray(logits[b, slots[b, i]], np.float32) - want[b, off]).max()
          for b in range(len(ids)) for i, off in enumerate(offsets[b]) if off is not None]
  return float(max(errs)), float(np.abs(want).max())


def _readme_example() -> str:
  text = open(README).read()
  section = text[text.index("## Importing the released weights"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_import_example_is_exact(released):
  torch_model, path = released
  code = _readme_example()
  assert "/ckpt/MQT-LLaVA-7B" in code
  ids, input_ids, text_mask, pixels = _inputs(97, 30)
  scope = {"images": pixels.permute(0, 2, 3, 1).numpy(), "input_ids": input_ids,
           "text_mask": text_mask}
  exec(code.replace("/ckpt/MQT-LLaVA-7B", path), scope)  # pylint: disable=exec-used
  assert scope["logits"].dtype == jnp.float32
  err, top = _max_error(scope["logits"], torch_model, ids, input_ids, text_mask, pixels, 36)
  assert top > 1.0
  assert err < 1e-4, err


def test_bfloat16_deviation(released, capsys):
  """The bfloat16 paths against the float32 reference (measured; README states it)."""
  torch_model, path = released
  config = mqt_llava.get_config()
  config.init.mqt_llava = path
  cfg = convert.model_config_for_checkpoint(config, user_set=())
  ids, input_ids, text_mask, pixels = _inputs(97, 30)
  images = pixels.permute(0, 2, 3, 1).numpy()
  out = {}
  for param_dtype in ("float32", "bfloat16"):
    params = convert.import_mqt_llava(path, cfg, param_dtype=param_dtype)
    for dtype in ("float32", "bfloat16"):
      logits, _ = MQTLLaVA(_with_dtype(cfg, dtype)).apply({"params": params}, images,
                                                          input_ids, text_mask, m=M)
      out[(param_dtype, dtype)], top = _max_error(logits, torch_model, ids, input_ids,
                                                  text_mask, pixels, M)
  with capsys.disabled():
    print(f"\nmax |logits| {top:.2f}; max abs error vs the float32 reference, "
          + ", ".join(f"params {p} compute {d}: {e:.2e}" for (p, d), e in out.items()))
  assert out[("float32", "float32")] < 1e-4
  for key in (("bfloat16", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")):
    assert 1e-3 < out[key] < 0.06 * top, key  # Measured: 0.12-0.13 with logits up to 5.8.


def _with_dtype(cfg: ModelConfig, dtype: str) -> ModelConfig:
  r = lambda c: dataclasses.replace(c, dtype=dtype)
  return dataclasses.replace(cfg, vision=r(cfg.vision), query=r(cfg.query), llm=r(cfg.llm))


def test_streamed_values_equal_the_checkpoint_and_torch_bin(tmp_path):
  llm, llm_cfg = ref.tiny_llama(seed=3)
  state = llm.state_dict()
  ref.save_safetensors(state, str(tmp_path / "st"), shards=2)
  os.makedirs(tmp_path / "bin")
  torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
  for scan in (False, True):
    lcfg = convert.llama_config_from_hf(_hf_json(llm_cfg), scan_layers=scan)
    a = convert.import_llama(str(tmp_path / "st"), lcfg)
    b = convert.import_llama(str(tmp_path / "bin"), lcfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
    q = a["layers"]["q_proj"]["kernel"][1] if scan else a["layers_1"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q, state["model.layers.1.self_attn.q_proj.weight"].numpy().T)
    np.testing.assert_array_equal(a["embed_tokens"]["embedding"],
                                  state["model.embed_tokens.weight"].numpy())


# ---------------------------------------------------------------------------
# Shapes from the checkpoint.

OTHER = ModelConfig(
    vision=VisionConfig(image_size=28, patch_size=7, width=32, depth=2, heads=16, mlp_dim=64),
    query=QueryConfig(num_queries=16, width=32, heads=16, out_dim=48),
    llm=LlamaConfig(vocab_size=104, width=48, depth=3, heads=6, kv_heads=3, head_dim=8,
                    mlp_dim=80, scan_layers=True))


@pytest.fixture(scope="module")
def other_size(tmp_path_factory):
  """A released-layout checkpoint of another size, written by the benchmark's writer."""
  path = str(tmp_path_factory.mktemp("other"))
  full_checkpoint.write_full_checkpoint(path, OTHER, dtype="float32", shards=2, tokenizer=False)
  return path


def _config(path, **model):
  config = mqt_llava.get_config()
  config.init.mqt_llava = path
  for field, value in model.items():
    part, name = field.split(".")
    config.model[part][name] = value
  return config


def test_leaves_get_the_requested_shardings_and_dtype(other_size):
  path = other_size
  config = mqt_llava.get_config()
  config.init.mqt_llava = path
  config.sharding.mesh.update(dict(data=2, fsdp=2, tensor=2))
  cfg = convert.model_config_for_checkpoint(config, user_set=())
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  shardings = params_lib.param_shardings(cfg, mesh, config.sharding.logical_axis_rules)
  params = convert.import_mqt_llava(path, cfg, param_dtype="bfloat16", shardings=shardings)
  exact = convert.import_mqt_llava(path, cfg, param_dtype="float32")
  assert jax.tree.structure(params) == jax.tree.structure(shardings)
  sharded = 0
  for x, s, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings),
                        jax.tree.leaves(exact)):
    assert isinstance(x, jax.Array) and x.dtype == jnp.bfloat16
    assert x.sharding.is_equivalent_to(s, x.ndim)
    sharded += len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
    want = np.asarray(want)
    # Round to nearest: within half a bfloat16 ulp (2^-8 relative) of the float32 value.
    np.testing.assert_array_less(np.abs(np.asarray(x, np.float32) - want),
                                 np.abs(want) * 2.0**-8 + 1e-30)
  assert sharded > 10


def test_a_checkpoint_of_another_size_imports_with_its_shapes(other_size):
  lines = []
  cfg = convert.model_config_for_checkpoint(_config(other_size), user_set=(), log=lines.append)
  for part in ("vision", "query", "llm"):
    for field in ("image_size", "patch_size", "width", "depth", "mlp_dim", "num_queries",
                  "out_dim", "vocab_size", "heads", "kv_heads", "head_dim"):
      if hasattr(getattr(OTHER, part), field):
        assert getattr(getattr(cfg, part), field) == getattr(getattr(OTHER, part), field), field
  assert len(lines) == 1 and "llm.depth 32 -> 3" in lines[0] and "query.num_queries 256 -> 16" \
      in lines[0]
  params = convert.import_mqt_llava(other_size, cfg)
  want = TensorSource(other_size).get("model.layers.2.mlp.down_proj.weight").T
  np.testing.assert_array_equal(params["llm"]["layers"]["down_proj"]["kernel"][2], want)
  logits, _ = MQTLLaVA(cfg).apply({"params": params}, np.zeros((1, 28, 28, 3), np.float32),
                                  np.array([[1, IMG, 5]]), np.ones((1, 3), bool), m=4)
  assert logits.shape == (1, 3 + 16 - 1, 104)


@pytest.mark.parametrize("field,value,says", [
    ("llm.depth", 5, r"config\.json num_hidden_layers says 3"),
    ("llm.heads", 8, r"config\.json num_attention_heads says 6"),
    ("vision.select_layer", -1, r"config\.json mm_vision_select_layer says -2"),
    ("query.num_queries", 64, r"model\.query_abstractor\.query \(16, 32\) says 16"),
])
def test_a_contradicting_user_setting_is_named(other_size, field, value, says):
  config = _config(other_size, **{field: value})
  with pytest.raises(CheckpointError, match=rf"--config\.model\.{re.escape(field)}={value} "
                                            rf"contradicts the checkpoint: .*{says}"):
    convert.model_config_for_checkpoint(config, user_set={f"model.{field}"})
  convert.model_config_for_checkpoint(config, user_set=(), log=None)  # A default: overridden.


def test_unrecorded_heads_must_divide_the_width(other_size):
  with pytest.raises(CheckpointError, match=r"config\.model\.query\.heads=5 does not divide "
                                            r"the width 32"):
    convert.model_config_for_checkpoint(_config(other_size, **{"query.heads": 5}), user_set=())


def test_init_clip_beside_a_checkpoint_with_the_tower_is_an_error(other_size, tmp_path):
  config = _config(other_size)
  config.init.clip = str(tmp_path)
  with pytest.raises(CheckpointError, match=rf"config\.init\.clip={tmp_path} would not be "
                                            rf"used: the checkpoint {other_size} holds"):
    convert.model_config_for_checkpoint(config, user_set=())
  cfg = convert.model_config_for_checkpoint(_config(other_size), user_set=())
  with pytest.raises(CheckpointError, match="would not be used"):
    convert.import_mqt_llava(other_size, cfg, clip_path=str(tmp_path))


def test_float32_refuses_before_reading_a_weight(other_size, monkeypatch):
  cfg = convert.model_config_for_checkpoint(_config(other_size), user_set=())
  nbytes, available = convert.params_bytes(cfg, "float32"), convert.params_bytes(cfg) * 6 // 10
  monkeypatch.setattr(mem_lib, "host_available_bytes", lambda: available)
  get = TensorSource.get
  monkeypatch.setattr(TensorSource, "get", lambda *a: pytest.fail("a weight was read"))
  mib = lambda x: f"{x / 2**20:.1f} MiB".replace(".", r"\.")
  with pytest.raises(convert.HostMemoryError,
                     match=rf"in float32 need {mib(nbytes + nbytes // 8)} of host memory "
                           rf"\({mib(nbytes)} of parameters \+ {mib(nbytes // 8)} headroom\) but "
                           rf"this host has {mib(available)} available \(MemAvailable\); "
                           rf"--param_dtype=bfloat16"):
    convert.import_mqt_llava(other_size, cfg, param_dtype="float32")
  monkeypatch.setattr(TensorSource, "get", get)
  convert.import_mqt_llava(other_size, cfg, param_dtype="bfloat16")  # Half: it fits.
  big = ModelConfig.from_config(mqt_llava.get_config().model)
  monkeypatch.setattr(mem_lib, "host_available_bytes", lambda: 24 * 2**30)
  with pytest.raises(convert.HostMemoryError, match=r"float32 need 27\.27 GiB .*\(26\.27 GiB of "
                                                    r"parameters .* 24\.00 GiB available"):
    convert.check_host_memory(big)
  convert.check_host_memory(big, "bfloat16")  # 14.1 GiB: fits.


# ---------------------------------------------------------------------------
# Stage 1 from CLIP + LLaMA: only the query transformer is random.

def test_stage1_creates_only_the_query_transformer(tmp_path, monkeypatch):
  clip, clip_cfg = ref.tiny_clip(seed=1, heads=16)
  llm, llm_cfg = ref.tiny_llama(seed=2)
  for name, model, cfg in (("clip", clip, clip_cfg), ("llm", llm, llm_cfg)):
    ref.save_safetensors(model.state_dict(), str(tmp_path / name))
    cfg.to_json_file(str(tmp_path / name / "config.json"))
  config = mqt_llava.get_config("stage=1")
  config.init.clip, config.init.llm = str(tmp_path / "clip"), str(tmp_path / "llm")
  config.model.query.num_queries = 16
  model_cfg = params_lib.model_config(config)
  assert (model_cfg.vision.heads, model_cfg.llm.depth) == (16, llm_cfg.num_hidden_layers)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  shardings = params_lib.param_shardings(model_cfg, mesh,
                                          config.sharding.logical_axis_rules)
  created = []
  random_params = params_lib.random_params  # pylint: disable=protected-access

  def recording(*args, **kwargs):
    out = random_params(*args, **kwargs)
    created.extend(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(out))
    return out

  monkeypatch.setattr(params_lib, "random_params", recording)
  params = params_lib.fresh_params(config, model_cfg, MQTLLaVA(model_cfg), shardings)
  assert created and all(k.startswith("['query']") for k in created)
  assert set(params) == {"vision", "query", "llm"}
  np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"],
                                llm.state_dict()["model.embed_tokens.weight"].numpy())
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)


def test_command_line_settings_count_as_the_users(other_size, tmp_path):
  """--config.model.* on the command line is what the user set (mqt/cli.user_settings)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "train.py"), "--config=configs/mqt_llava.py:stage=1",
         f"--workdir={tmp_path}", "--dry_run", f"--config.init.mqt_llava={other_size}",
         "--config.model.llm.depth=5"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert (f"--config.model.llm.depth=5 contradicts the checkpoint: {other_size}/config.json "
          f"num_hidden_layers says 3") in proc.stderr
