"""Configs: structural knobs after `:`, locked scalars, unknown keys are errors."""
import pytest
from absl import flags
from ml_collections import config_flags

from configs import mqt_llava, tiny
from mqt.model import ModelConfig
from mqt import run_inputs
from mqt import plan


def test_knobs_parse_and_validate():
  assert mqt_llava.get_config("stage=1").run_stages == "1"
  assert mqt_llava.get_config("stage=2,variant=perceiver").model.query.variant == "perceiver"
  with pytest.raises(ValueError, match="unknown config knob 'stag'"):
    mqt_llava.get_config("stag=1")
  with pytest.raises(ValueError, match="config knob stage='two' is not a valid int"):
    mqt_llava.get_config("stage=two")
  with pytest.raises(ValueError, match="stage must be 1 or 2"):
    mqt_llava.get_config("stage=3")


def test_unknown_model_key_is_named():
  config = tiny.get_config()
  config.model.llm.widht = 3
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['widht'\] in config.model.llm"):
    ModelConfig.from_config(config.model)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="unknown query transformer variant 'qformer'"):
    from mqt.query_transformer import make_query_transformer
    make_query_transformer(ModelConfig.from_config(tiny.get_config().model).query.__class__(
        variant="qformer"))


def test_config_flags_lock_and_override(tmp_path):
  def parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config
  config = parse(["prog", "--config=configs/mqt_llava.py:stage=1", "--config.model.llm.depth=4"])
  assert config.run_stages == "1" and config.model.llm.depth == 4
  with pytest.raises(Exception, match="widht"):
    parse(["prog", "--config=configs/tiny.py", "--config.model.llm.widht=4"])


def test_dtype_option_gives_bf16_compute_with_f32_params():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import linen as nn
  from mqt.model import MQTLLaVA, dummy_inputs
  config = tiny.get_config()
  config.model.dtype = "bfloat16"
  cfg = ModelConfig.from_config(config.model)
  model = MQTLLaVA(cfg)
  images, ids, mask = dummy_inputs(cfg, 2, 6)
  params = nn.unbox(model.init(jax.random.key(0), images, ids, mask, 4))
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  hidden = jax.make_jaxpr(lambda p: model.apply(p, images, ids, mask, 4)[0])(params)
  assert "bf16[2,14,128]" in str(hidden)  # Decoder activations run in bfloat16.
  logits, _ = model.apply(params, images, ids, mask, 4)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_each_data_block_may_set_its_own_max_len(tmp_path):
  """A stage's (or the eval's) data block max_len overrides config.data.max_len; 0
  inherits it; too short for the visual tokens is an error naming the setting."""
  from data import synthetic
  from data import tokenizer as tokenizer_lib
  config = tiny.get_config()
  config.tokenizer_path = tokenizer_lib.train_tokenizer(
      synthetic.corpus_text(0, 50), str(tmp_path / "tokenizer.model"), vocab_size=400)
  cfg = ModelConfig.from_config(config.model)
  m = cfg.query.num_queries
  got = lambda d: run_inputs.pipeline_config(config, d, cfg, str(tmp_path), train=True).max_text_len
  assert got(config.stage1.data) == 64 - m + 1
  assert got(config.stage2.data) == config.data.max_len - m + 1
  config.eval.data.max_len = 112
  assert got(config.eval.data) == 112 - m + 1
  config.stage2.data.max_len = m  # One text slot: not even BOS and the placeholder.
  with pytest.raises(ValueError, match=f"the data block's max_len={m} leaves no room"):
    got(config.stage2.data)
  with pytest.raises(ValueError, match=f"config.stage2.data.max_len={m} leaves no room"):
    run_inputs.pipeline_config(config, config.stage2.data, cfg, str(tmp_path), train=True,
                          where="config.stage2.data")
  config.stage2.data.max_len, config.data.max_len = 0, m - 1
  with pytest.raises(ValueError, match=rf"config.data.max_len={m - 1} leaves no room"):
    got(config.stage2.data)


def test_a_default_config_has_no_problems():
  from mqt import validate
  assert validate.config_problems(tiny.get_config(), devices=8) == []
  assert validate.config_problems(mqt_llava.get_config("stage=2"), devices=8) == []


def test_config_problems_name_each_field_and_what_is_allowed():
  from mqt import validate
  config = tiny.get_config()
  config.model.dtype = "float64"
  config.model.query.variant = "qformer"
  config.eval.ms = (1, 12)
  config.stage1.matryoshka.m = 10
  config.stage2.matryoshka.kind = "sometimes"
  config.stage2.matryoshka.ms = (0,)
  config.stage2.matryoshka.buckets = (4, 16)
  config.stage1.data.template = "chatml"
  config.stage2.data.image_mode = "stretch"
  config.stage2.data.kind = "csv"
  config.data.overlong = "drop"
  config.stage1.data.batch_size = 0
  config.stage2.steps = -1
  config.checkpoint.keep = 0
  problems = validate.config_problems(config, devices=8)
  want = ["--config.model.dtype=float64 is not allowed: choose float32 | bfloat16 | float16",
          "--config.model.query.variant=qformer is not allowed: choose official | perceiver",
          "--config.eval.ms=(1, 12): m=12 is out of range: 1 <= m <= M=9",
          "--config.stage1.matryoshka.m=10: the fixed m must be 0 (= M) or 1 <= m <= M=9",
          "--config.stage2.matryoshka.kind=sometimes is not allowed: choose official | uniform",
          "--config.stage2.matryoshka.ms=(0,): m=0 is out of range: 1 <= m <= M=9",
          "--config.stage2.matryoshka.buckets=(4, 16): bucket size 16 is out of range: each "
          "must be an integer in 1..M=9",
          "--config.stage1.data.template=chatml is not allowed: choose plain | vicuna_v1 | qa",
          "--config.stage2.data.image_mode=stretch is not allowed: choose pad | crop",
          "--config.stage2.data.kind=csv is not allowed: choose builtin | tfds | json",
          "--config.data.overlong=drop is not allowed: choose truncate | reject",
          "--config.stage1.data.batch_size=0 must be an integer >= 1",
          "--config.stage2.steps=-1 must be an integer >= 0",
          "--config.checkpoint.keep=0 must be an integer >= 1"]
  for line in want:
    assert sum(p.startswith(line) for p in problems) == 1, (line, problems)
  assert len(problems) == len(want), problems
  assert not validate.config_problems(config, devices=8, skip=("model", "eval", "stage", "data",
                                                               "checkpoint"))


def test_mesh_and_run_stages_problems():
  from mqt import validate
  config = tiny.get_config()
  config.sharding.mesh.update(dict(data=2, fsdp=8, tensor=1))
  assert validate.config_problems(config, devices=8) == [
      "--config.sharding.mesh (data=2, fsdp=8, tensor=1) needs 16 devices, more than the 8 "
      "there are: make the product 8, or set one axis to -1"]
  assert validate.config_problems(config, devices=16) == []
  config.sharding.mesh.update(dict(data=-1, fsdp=3))
  assert validate.config_problems(config, devices=8) == [
      "--config.sharding.mesh (data=-1, fsdp=3, tensor=1): the fixed axes take 3 devices, "
      "which does not divide the 8 there are"]
  config.sharding.mesh.update(dict(data=-1, fsdp=-1))
  assert "at most one axis may be -1" in validate.config_problems(config, devices=8)[0]
  config = tiny.get_config()
  config.run_stages = "1,3,x"
  assert validate.config_problems(config, devices=1) == [
      "--config.run_stages=1,3,x: there is no config.stage3 block (the config has stage1, "
      "stage2)",
      "--config.run_stages=1,3,x: 'x' is not a stage number (e.g. 1,2 for stage1, stage2)"]


def test_unknown_override_keys_get_close_matches():
  from mqt import cli
  config = tiny.get_config()
  got = cli.unknown_key_problems(config, ["stage1.stepz", "model.llm.widht", "stage1.steps",
                                          "zzz_qqq"], "--config=configs/tiny.py")
  assert len(got) == 3, got
  assert got[0].startswith("--config.stage1.stepz: unknown config key 'stage1.stepz' in "
                           "--config=configs/tiny.py; did you mean stage1.steps")
  assert "did you mean model.llm.width" in got[1]
  assert got[2].endswith("see the fields in --config=configs/tiny.py")
  assert cli.flag_problems(["prog", "--config=configs/tiny.py:stag=1"]) == [
      "--config=configs/tiny.py:stag=1: unknown config knob 'stag'; known knobs: ['train_query', 'variant']"]
  assert cli.flag_problems(["prog", "--config", "configs/nope.py"]) == [
      "--config=configs/nope.py: no such file configs/nope.py"]
  assert cli.int_list("ms", ["1", " 2", "x"]) == ([1, 2], ["--ms=1, 2,x: 'x' is not an integer"])


def test_user_errors_exit_with_a_status_and_no_traceback(capsys):
  from absl import app
  from mqt import cli
  from mqt import train
  cases = [(cli.UserError("bad --m"), 2), (app.UsageError("stray"), 2),
           (ValueError("bad value"), 1), (train.NonFiniteLossError("loss nan"), 1),
           (plan.StepDoesNotFitError("too big"), 1), (FileNotFoundError("gone"), 1)]
  for error, status in cases:
    def main(argv, error=error):
      raise error
    with pytest.raises(SystemExit) as exit_:
      cli.guarded(main)(["prog"])
    assert exit_.value.code == status
    assert capsys.readouterr().err == f"error: {error}\n"
  with pytest.raises(KeyError):  # A bug keeps its traceback.
    cli.guarded(lambda argv: {}["x"])(["prog"])
  several = cli.Problems()
  several.add(["a", "b"])
  several.check(lambda: (_ for _ in ()).throw(ValueError("this run cannot start:\n  c\n  d")))
  assert several.check(lambda: {}["x"]) is None  # A consequence of the problems above.
  with pytest.raises(cli.UserError, match=r"^this run cannot start \(4 problems\):\n  a\n  b\n"
                     r"  c\n  d$"):
    several.raise_if_any()


def test_infer_data_kinds_is_idempotent():
  from mqt import config_lib
  config = tiny.get_config()
  config.stage1.data.json_path = "/data/x.json"
  assert len(config_lib.infer_data_kinds(config)) == 1
  assert config.stage1.data.kind == "json"
  assert config_lib.infer_data_kinds(config) == [] and config.stage1.data.kind == "json"
