"""Export to the released layout: round trip, strict loads into the torch reference,
logits parity, export of a trained checkpoint, and export.py's errors.

Tiny random models (tests/torch_reference.py); the round trip and the parity
test run scanned and unrolled LLM stacks.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util

from configs import tiny
from mqt import convert
from mqt import export
from mqt import train
from mqt.checkpoint_io import TensorSource
from mqt.model import IGNORE, MQTLLaVA, ModelConfig, abstract_params, text_slots, unbox_abstract
from mqt.query_transformer import QueryConfig
from tests import torch_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 16
ATOL = 1e-4
SMALL_SHARDS = 40_000  # Bytes: the tiny model in several shards.


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  """A tiny MQT-LLaVA in the released layout (3 shards, config.json, tokenizer files),
  its torch modules and our ModelConfig for it."""
  clip, clip_cfg = ref.tiny_clip(seed=4)
  llm, llm_cfg = ref.tiny_llama(seed=5)
  query = ref.randomize_(ref.RefQueryTransformer(clip_cfg.hidden_size, 4, llm_cfg.hidden_size, M),
                         seed=6)
  state = ref.released_state(clip, query, llm)
  path = ref.save_safetensors(state, str(tmp_path_factory.mktemp("mqt_llava")), shards=3)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**llm_cfg.to_dict(), "mm_vision_tower": "tiny-clip", "transformers_version": "x"},
              f)
  for name in ("tokenizer.model", "tokenizer_config.json"):
    with open(os.path.join(path, name), "w") as f:
      f.write(name)
  cfg = ModelConfig(
      vision=convert.vision_config_from_hf(clip_cfg.to_dict()),
      query=QueryConfig(variant="official", num_queries=M, width=clip_cfg.hidden_size, heads=4,
                        out_dim=llm_cfg.hidden_size),
      llm=convert.llama_config_from_hf(llm_cfg.to_dict()))
  return path, cfg, (clip_cfg, llm_cfg)


def _scanned(cfg: ModelConfig, scan: bool) -> ModelConfig:
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=scan))


def _leaves(params):
  return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def _assert_trees_equal(a, b):
  a, b = _leaves(a), _leaves(b)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("scan", [True, False])
def test_import_export_import_is_bitwise(hf_checkpoint, tmp_path, scan):
  path, cfg, _ = hf_checkpoint
  cfg = _scanned(cfg, scan)
  params = convert.import_mqt_llava(path, cfg)
  out = str(tmp_path / "out")
  index = export.export(export.TreeLeaves(params), cfg, out, shard_bytes=SMALL_SHARDS,
                        tokenizer_dir=path, base_config=convert.read_hf_config(path))
  _assert_trees_equal(params, convert.import_mqt_llava(out, cfg))
  # The same keys, shapes and values as the source checkpoint, in several shards.
  assert export.compare(path, out)["problems"] == []
  assert len(set(index["weight_map"].values())) > 2
  assert sorted(os.listdir(out)) == sorted(
      ["config.json", "model.safetensors.index.json", "tokenizer.model",
       "tokenizer_config.json"] + sorted(set(index["weight_map"].values())))
  hf = json.load(open(os.path.join(out, "config.json")))
  assert hf["transformers_version"] == "x" and hf["mm_vision_tower"] == "tiny-clip"
  assert hf["torch_dtype"] == "float32" and hf["model_type"] == "llava_llama"
  # config.json reads back as the same architecture.
  assert convert.llama_config_from_hf(hf) == dataclasses.replace(cfg.llm, scan_layers=False)
  assert convert.vision_config_from_hf(hf["mm_vision_config"]) == cfg.vision
  assert hf["mm_num_queries"] == M and hf["mm_vision_select_layer"] == -2


def test_bfloat16_export_rounds_once(hf_checkpoint, tmp_path):
  path, cfg, _ = hf_checkpoint
  params = convert.import_mqt_llava(path, cfg)
  out = str(tmp_path / "bf16")
  export.export(export.TreeLeaves(params), cfg, out, dtype="bfloat16")
  src, got = TensorSource(path), TensorSource(out)
  for k in src.keys():
    want = np.asarray(src.get(k), np.float32).astype(ml_dtypes.bfloat16)
    assert got.get(k).dtype == ml_dtypes.bfloat16, k
    np.testing.assert_array_equal(got.get(k), want, err_msg=k)
  result = export.compare(path, out, rel_tol=2.0**-8, cast="bfloat16")
  assert result["problems"] == [] and 0 < result["max_rel"] <= 2.0**-8
  assert result["cast_equal"] == result["tensors"] == len(list(src.keys()))
  assert export.compare(path, out)["problems"]  # Not bitwise: the tolerance is needed.
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"


def _noisy_init(cfg: ModelConfig, seed: int):
  """Random parameters of the model's shapes, norm scales near 1 (not exactly), so a
  swapped or transposed tensor shows in the logits."""
  shapes = export.flat_shapes(unbox_abstract(abstract_params(cfg))["params"])
  rng = np.random.default_rng(seed)
  out = {}
  for path, (shape, dtype) in sorted(shapes.items()):
    n = rng.standard_normal(shape).astype(dtype)
    fan_in = shape[-2] if len(shape) >= 2 else 16
    out[path] = 1.0 + 0.2 * n if path.endswith("scale") else n * min(0.2, 2.0 / np.sqrt(fan_in))
  return traverse_util.unflatten_dict(out, sep="/")


def _strip(state: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_strict(module, state: dict) -> None:
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                         strict=True)


@pytest.mark.parametrize("scan", [True, False])
def test_export_loads_strictly_into_torch_and_gives_our_logits(hf_checkpoint, tmp_path, scan):
  _, cfg, (clip_cfg, llm_cfg) = hf_checkpoint
  cfg = _scanned(cfg, scan)
  params = _noisy_init(cfg, seed=3)
  out = str(tmp_path / "out")
  export.export(export.TreeLeaves(params), cfg, out, shard_bytes=SMALL_SHARDS)
  src = TensorSource(out)
  state = {k: src.get(k) for k in src.keys()}
  vision = _strip(state, "model.vision_tower.vision_tower.")
  query = _strip(state, export.LLAVA_QUERY)
  llm_state = {k: v for k, v in state.items()
               if not k.startswith(("model.vision_tower.", export.LLAVA_QUERY))}
  assert len(vision) + len(query) + len(llm_state) == len(state)

  clip = ref.CLIPVisionModel(clip_cfg).eval()
  if not any(k.startswith("vision_model.") for k in clip.state_dict()):
    vision = _strip(vision, "vision_model.")  # transformers 5 names its own without it.
  _load_strict(clip, vision)
  llm = ref.LlamaForCausalLM(llm_cfg).eval()
  _load_strict(llm, llm_state)
  resampler = ref.RefQueryTransformer(clip_cfg.hidden_size, 4, llm_cfg.hidden_size, M).eval()
  _load_strict(resampler, query)
  torch_model = ref.RefMQTLLaVA(clip, resampler, llm).eval()

  rng = np.random.default_rng(0)
  ids = [rng.integers(1, cfg.llm.vocab_size, size=n) for n in (6, 9)]
  for x, p in zip(ids, (1, 3)):
    x[p] = ref.IMAGE
  t = max(len(x) for x in ids)
  ids_np = np.zeros((2, t), np.int64)
  mask_np = np.zeros((2, t), bool)
  for b, x in enumerate(ids):
    ids_np[b, :len(x)], mask_np[b, :len(x)] = x, True
  size = cfg.vision.image_size
  pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
  model = MQTLLaVA(cfg)
  run = jax.jit(lambda p, m: model.apply({"params": p}, pixels.permute(0, 2, 3, 1).numpy(),
                                         ids_np, mask_np, m)[0])
  for m in (1, M):
    with torch.no_grad():
      want, _, offsets = torch_model(pixels, [torch.tensor(x) for x in ids],
                                     [torch.full((len(x),), IGNORE) for x in ids], m)
    logits = run(params, jnp.int32(m))
    slots = np.asarray(text_slots(ids_np, mask_np, m, cfg.image_token_id))
    for b in range(2):
      for i, off in enumerate(offsets[b]):
        if off is not None:
          assert slots[b, i] == off
          np.testing.assert_allclose(np.asarray(logits[b, off]), ref.to_np(want[b, off]),
                                     atol=ATOL, rtol=0, err_msg=f"m={m} b={b} t={i}")
    assert np.abs(ref.to_np(want)).max() > 1.0


def test_rules_read_backwards_cover_every_key(hf_checkpoint):
  """The export plan makes exactly the source's keys and shapes from our abstract tree."""
  path, cfg, _ = hf_checkpoint
  shapes = export.flat_shapes(
      unbox_abstract(abstract_params(_scanned(cfg, True)))["params"])
  planned = {t.key: t.shape for t in export.plan(shapes)}
  src = TensorSource(path)
  assert planned == {k: tuple(src.shape(k)) for k in src.keys()}
  assert planned == convert.checkpoint_layout(_scanned(cfg, True))


def test_perceiver_and_unknown_leaves_are_refused(hf_checkpoint, tmp_path):
  _, cfg, _ = hf_checkpoint
  params = jax.tree.map(np.asarray, _noisy_init(cfg, seed=0))
  params["llm"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  with pytest.raises(export.ExportError, match=r"llm: no conversion rule for parameter\(s\) "
                     r"\['extra/kernel'\]"):
    export.export(export.TreeLeaves(params), cfg, str(tmp_path / "a"))
  perceiver = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, variant="perceiver"))
  with pytest.raises(export.ExportError, match="official query transformer"):
    export.export(export.TreeLeaves(params), perceiver, str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("group_bytes", [1, 2**30])
def test_orbax_source_restores_a_few_leaves_at_a_time(hf_checkpoint, tmp_path, group_bytes):
  """A scanned tree saved as train.py saves its state, exported leaf by leaf (group_bytes
  1: one leaf per restore) or in one group: the saved values, written as bfloat16."""
  from mqt import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  _, cfg, _ = hf_checkpoint
  cfg = _scanned(cfg, True)
  params = _noisy_init(cfg, seed=7)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=1, use_async=False)
  ckpt.save(5, {"params": params, "opt_state": {"mu": params}, "step": np.int32(5)}, None,
            force=True)
  ckpt.close()
  source = export.OrbaxLeaves(str(tmp_path / "ckpt"), group_bytes=group_bytes)
  assert source.step == 5 and source.shapes == export.flat_shapes(params)
  out = str(tmp_path / "out")
  export.export(source, cfg, out, dtype="bfloat16", shard_bytes=SMALL_SHARDS)
  bf16 = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, param_dtype="bfloat16"),
                             query=dataclasses.replace(cfg.query, param_dtype="bfloat16"),
                             vision=dataclasses.replace(cfg.vision, param_dtype="bfloat16"))
  got = _leaves(convert.import_mqt_llava(out, bf16))
  for path, x in _leaves(params).items():
    np.testing.assert_array_equal(got[path], x.astype(ml_dtypes.bfloat16), err_msg=path)


# ---------------------------------------------------------------------------
# A checkpoint written by train.py, and the entry point.

def _tiny_run_config(data_dir):
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.data.builtin_sizes.update(dict(captions=16, instruct=16, eval=8))
  config.run_stages = "1"
  config.stage1.steps = 2
  config.stage1.data.batch_size = 8
  config.checkpoint.every = 2
  config.checkpoint.use_async = False
  config.eval.ms = ()
  return config


def _overrides(data_dir):
  return [f"--config.data.data_dir={data_dir}", "--config.run_stages=1",
          "--config.data.builtin_sizes.captions=16", "--config.data.builtin_sizes.instruct=16",
          "--config.data.builtin_sizes.eval=8"]


def _export_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"),
                         "--config=configs/tiny.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  config = _tiny_run_config(root / "data")
  train.train_and_evaluate(config, str(root / "w"))
  return config, root


def test_export_of_a_trained_checkpoint_gives_the_trained_values(trained, tmp_path):
  config, root = trained
  out = tmp_path / "out"
  proc = _export_cli(f"--workdir={root / 'w'}", f"--out={out}", *_overrides(root / "data"),
                     "--max_shard_size=100kB")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg = ModelConfig.from_config(config.model)
  folder = os.path.join(root, "w", "stage1", "checkpoints")
  want = export.OrbaxLeaves(folder)
  got = _leaves(convert.import_mqt_llava(str(out), cfg))
  assert sorted(got) == sorted(want.shapes)
  for path in got:
    np.testing.assert_array_equal(got[path], want.get(path, None, np.float32), err_msg=path)
  assert "tokenizer.model" in os.listdir(out)
  hf = json.load(open(out / "config.json"))
  assert hf["mm_num_queries"] == 9 and hf["torch_dtype"] == "float32"
  # Trained, not initial values: stage 1 trains every part (norm scales start at 1).
  assert not np.all(got["llm/norm/scale"] == 1.0)

  dry = tmp_path / "dry"
  proc = _export_cli(f"--workdir={root / 'w'}", f"--out={dry}", *_overrides(root / "data"),
                     "--dry_run", "--param_dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dry run: would write" in proc.stdout and "(bfloat16) in 1 shard(s)" in proc.stdout
  assert not dry.exists()

  bf16 = tmp_path / "bf16"
  proc = _export_cli(f"--workdir={root / 'w'}", f"--out={bf16}", "--param_dtype=bfloat16",
                     *_overrides(root / "data"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert TensorSource(str(bf16)).get("lm_head.weight").dtype == ml_dtypes.bfloat16


def test_cli_errors_name_the_culprit(trained, tmp_path):
  config, root = trained
  proc = _export_cli(f"--workdir={tmp_path / 'absent'}", f"--out={tmp_path / 'o'}")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      f"export.py: checkpoint folder {tmp_path / 'absent' / 'stage2' / 'checkpoints'} does not "
      f"exist (train first with python train.py --workdir=..., or pass --checkpoint=DIR or =hf)")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "notes.txt").write_text("mine")
  for extra in ([], ["--overwrite"]):
    proc = _export_cli(f"--workdir={root / 'w'}", f"--out={busy}", *_overrides(root / "data"),
                       *extra)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"export.py: --out={busy} ")
  assert os.listdir(busy) == ["notes.txt"]
  proc = _export_cli(f"--workdir={root / 'w'}", f"--out={tmp_path / 'o'}",
                     *_overrides(root / "data"), "--config.model.llm.mlp_dim=64")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("export.py: checkpoint ")
  assert ("parameter llm/layers_0/down_proj/kernel has shape [256, 128], the config's model "
          "[64, 128]") in proc.stderr
  proc = _export_cli(f"--workdir={root / 'w'}", f"--out={tmp_path / 'o'}", "--checkpoint=hf")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "export.py: --checkpoint=hf exports the weights --config.init.mqt_llava names; "
      "it is not set")
  # An earlier export is replaced with --overwrite only.
  out = tmp_path / "again"
  for extra, rc in (([], 0), ([], 1), (["--overwrite"], 0)):
    proc = _export_cli(f"--workdir={root / 'w'}", f"--out={out}", *_overrides(root / "data"),
                       *extra)
    assert (proc.returncode != 0) == bool(rc), proc.stderr[-2000:]


def test_cli_reexports_hf_weights(hf_checkpoint, tmp_path):
  """--checkpoint=hf: the architecture from the checkpoint (not configs/tiny.py's), the
  weights imported and written back under the same names, shapes and values."""
  path, _, _ = hf_checkpoint
  out = tmp_path / "out"
  proc = _export_cli(f"--workdir={tmp_path / 'w'}", "--checkpoint=hf",
                     f"--config.init.mqt_llava={path}", f"--out={out}",
                     "--config.model.query.spatial_init=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert export.compare(path, str(out))["problems"] == []
  assert {"tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(out))
  assert json.load(open(out / "config.json"))["mm_num_queries"] == M


def test_importing_some_components_reads_those_subtrees_only(hf_checkpoint):
  path, cfg, _ = hf_checkpoint
  full = convert.import_mqt_llava(path, cfg)
  part = convert.import_mqt_llava(path, cfg, components=("vision", "query"))
  assert sorted(part) == ["query", "vision"]
  _assert_trees_equal({k: full[k] for k in part}, part)
