"""Configs: structural knobs after `:`, locked scalars, unknown keys are errors."""
import pytest
from absl import flags
from ml_collections import config_flags

from configs import mqt_llava, tiny
from mqt.model import ModelConfig


def test_knobs_parse_and_validate():
  assert mqt_llava.get_config("stage=1").stage == 1
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
  assert config.stage == 1 and config.model.llm.depth == 4
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
  from mqt import train
  config = tiny.get_config()
  config.tokenizer_path = tokenizer_lib.train_tokenizer(
      synthetic.corpus_text(0, 50), str(tmp_path / "tokenizer.model"), vocab_size=400)
  cfg = ModelConfig.from_config(config.model)
  m = cfg.query.num_queries
  got = lambda d: train.pipeline_config(config, d, cfg, str(tmp_path), train=True).max_text_len
  assert got(config.stage1.data) == 64 - m + 1
  assert got(config.stage2.data) == config.data.max_len - m + 1
  config.eval.data.max_len = 112
  assert got(config.eval.data) == 112 - m + 1
  config.stage2.data.max_len = m  # One text slot: not even BOS and the placeholder.
  with pytest.raises(ValueError, match=f"the data block's max_len={m} leaves no room"):
    got(config.stage2.data)
  with pytest.raises(ValueError, match=f"config.stage2.data.max_len={m} leaves no room"):
    train.pipeline_config(config, config.stage2.data, cfg, str(tmp_path), train=True,
                          where="config.stage2.data")
  config.stage2.data.max_len, config.data.max_len = 0, m - 1
  with pytest.raises(ValueError, match=rf"config.data.max_len={m - 1} leaves no room"):
    got(config.stage2.data)
