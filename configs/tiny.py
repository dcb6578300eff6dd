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
      vocab_size=1024, width=128, depth=2, heads=4, kv_heads=2, head_dim=32,
      mlp_dim=256, rms_eps=1e-5, rope_theta=10000.0,
      scan_layers=False, remat_policy="none"))

  config.sharding = ml_collections.ConfigDict()
  config.sharding.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding.logical_axis_rules = config_lib.logical_axis_rules()

  # Both stages on the built-in synthetic data (prepared under <workdir>/data
  # on first use). What differs from the paper, and why: the towers are
  # random, not pretrained CLIP and Vicuna, so stage 1 also trains the LLM (a
  # frozen random LLM cannot learn to caption); lr 1e-3 throughout (a small
  # model from scratch, not a 7B fine-tune); minutes of CPU, not GPU-days.
  config_lib.run_block(config)
  config.run_stages = "1,2"
  config.data.max_len = 128
  config.checkpoint.every = 200
  config.log_every = 50
  config.stage1 = config_lib.stage_block(
      steps=300, lr=1e-3, rules=(("^query/", 1.0), ("^llm/", 1.0), ("^vision/", None)),
      matryoshka_kind="fixed", m=0,
      data=config_lib.data_block(split="captions", template="plain", image_mode="pad",
                                 batch_size=32, group_by_modality=False))
  config.stage2 = config_lib.stage_block(
      steps=1200, lr=1e-3, rules=config_lib.STAGE2_RULES, matryoshka_kind="official",
      data=config_lib.data_block(split="instruct", template="vicuna_v1", image_mode="pad",
                                 batch_size=32, group_by_modality=True))
  config.eval.ms = (1, 2, 4, 8, 16)
  return config
