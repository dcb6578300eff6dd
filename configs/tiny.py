r"""A CPU-sized MQT-LLaVA: the project's built-in default.

Same structure as configs/mqt_llava.py (CLIP-style tower, the official query
transformer, LLaMA decoder with grouped-query attention), small enough to
train on two CPU cores in about 13 minutes.

  python train.py --config=configs/tiny.py

Knobs after `:`: variant (official|perceiver).

What differs from the paper's recipe, and why: the towers start random, not
from pretrained CLIP and Vicuna, so
(1) the vision tower trains (a random, frozen tower would give the query
    transformer nothing worth pooling), and stage 1 trains the LLM too (a
    frozen random LLM cannot learn to caption);
(2) the query transformer starts with `spatial_init` (q_proj = k_proj at
    initialization, so each latent first pools its own region of the image).
    With the official random init every latent starts as a near-uniform
    average over patches and stays one for hundreds of steps: after 500
    stage-1 steps a linear probe reads a cell's colour from the ViT features
    at 0.99 but from the 16 latents at the majority rate (0.72), and captions
    name colours / counts / cells at 0.59 / 0.64 / 0.60; with spatial_init
    0.79 / 0.89 / 0.82 (held-out teacher-forced accuracy of those words);
(3) 72 px images with 24 px patches: the 3x3 patches are the synthetic
    scenes' 3x3 cells (objects are centred in them), so the tower sees each
    object whole in one patch (the data's choices that help a random tower,
    outlined shapes and the caption order, are in data/synthetic.py);
(4) lr 1e-3 in both stages (a small model from scratch, not a 7B fine-tune;
    3e-3 learned slower), and sequence lengths per stage (captions fit 64
    tokens, instruction conversations 160);
(5) about 1,700 steps on CPU instead of GPU-days.
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
  m.train_vision = True  # Random towers must learn to see (see above).
  m.vision = ml_collections.ConfigDict(dict(
      image_size=72, patch_size=24, width=64, depth=3, heads=4, mlp_dim=128,
      ln_eps=1e-5, channels=3, select_layer=-2, keep_cls=False))
  m.query = ml_collections.ConfigDict(dict(
      variant=knobs.variant, num_queries=16, heads=4, ln_eps=1e-6,
      depth=1, mlp_dim=128, latent_attention="prefix",
      spatial_init=knobs.variant == "official"))  # official only (see above).
  m.llm = ml_collections.ConfigDict(dict(
      vocab_size=1024, width=128, depth=2, heads=4, kv_heads=2, head_dim=32,
      mlp_dim=256, rms_eps=1e-5, rope_theta=10000.0,
      scan_layers=False, remat_policy="none"))

  config.sharding = ml_collections.ConfigDict()
  config.sharding.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding.logical_axis_rules = config_lib.logical_axis_rules()

  # Both stages on the built-in synthetic data (prepared under <workdir>/data
  # on first use); see the module docstring for what differs from the paper.
  config_lib.run_block(config)
  config.run_stages = "1,2"
  config.data.max_len = 160  # Stage 2 conversations; stage 1 and the eval set their own.
  config.data.builtin_image_size = 72
  config.checkpoint.every = 200
  config.log_every = 50
  every_part = (("^query/", 1.0), ("^llm/", 1.0), ("^vision/", 1.0))
  config.stage1 = config_lib.stage_block(
      steps=900, lr=1e-3, rules=every_part, matryoshka_kind="fixed", m=0,
      data=config_lib.data_block(split="captions", template="plain", image_mode="pad",
                                 batch_size=32, group_by_modality=False, max_len=64))
  config.stage2 = config_lib.stage_block(
      steps=800, lr=1e-3, rules=every_part, matryoshka_kind="official",
      data=config_lib.data_block(split="instruct", template="vicuna_v1", image_mode="pad",
                                 batch_size=32, group_by_modality=True))
  config.eval.ms = (1, 2, 4, 8, 16)
  config.eval.data.max_len = 112  # Single questions: at most 83 text tokens.
  return config
