r"""A CPU-sized MQT-LLaVA: the project's built-in default.

Same structure as configs/mqt_llava.py (CLIP-style tower, official query
transformer, LLaMA decoder with grouped-query attention), small enough to
train on two CPU cores.

  python train.py --config=configs/tiny.py

Knobs after `:`: variant (official|perceiver).
"""
import ml_collections

from mqt import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  knobs = config_lib.parse_knobs(arg, variant="official")
  config = ml_collections.ConfigDict()
  config.stage = 2

  config.model = ml_collections.ConfigDict()
  m = config.model
  m.dtype = "float32"  # bf16 is slower than f32 on CPU.
  m.param_dtype = "float32"
  m.image_token_id = -200
  m.train_vision = False
  m.vision = ml_collections.ConfigDict(dict(
      image_size=64, patch_size=8, width=64, depth=3, heads=4, mlp_dim=128,
      ln_eps=1e-5, channels=3, select_layer=-2, keep_cls=False))
  m.query = ml_collections.ConfigDict(dict(
      variant=knobs.variant, num_queries=16, heads=4, ln_eps=1e-6,
      depth=1, mlp_dim=128, latent_attention="prefix"))
  m.llm = ml_collections.ConfigDict(dict(
      vocab_size=512, width=128, depth=2, heads=4, kv_heads=2, head_dim=32,
      mlp_dim=256, rms_eps=1e-5, rope_theta=10000.0,
      scan_layers=False, remat_policy="none"))

  config.sharding = ml_collections.ConfigDict()
  config.sharding.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding.logical_axis_rules = config_lib.logical_axis_rules()
  return config
