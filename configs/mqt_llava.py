r"""MQT-LLaVA-7B: CLIP ViT-L/14-336 + Matryoshka query transformer (M=256) + Vicuna-7B.

The released architecture and the paper's two-stage recipe.

  python train.py --config=configs/mqt_llava.py:stage=1 --workdir=/ckpt/stage1
  python train.py --config=configs/mqt_llava.py:stage=2 --workdir=/ckpt/stage2

Knobs after `:`: stage (1|2), variant (official|perceiver). Data, tokenizer, CLIP, Vicuna
and stage-1 checkpoint paths are empty on purpose: set each with --config.<field>=...
(README, "Training at scale", has the full commands).

Expected time: not measured here (no accelerator was available); stage 1 is 2,180 steps
of batch 256, stage 2 10,390 steps of batch 128, samples of up to 2,048 tokens. With
--dry_run either stage compiles on abstract parameters in 13-24 s and prints its memory
per device: 7.66 GiB on 64 devices (stage 1), 40.61 GiB on 8 (stage 2), CPU-backend
figures and an upper bound.

Headline: the released MQT-LLaVA-7B imports exactly (float32 logits within 1e-4 of HF
CLIP + the released resampler + HF LLaMA, tests/test_import.py) and answers at any m
from 1 to 256; no benchmark accuracy of the 7B has been measured here.

What differs from the paper: the recipe's values (data, learning rates, batch sizes, m
per stage) are the paper's; how a step runs differs: both stages accumulate gradients
over 2 micro-batches (same global batch), stage 2 compiles one step per m bucket (64,
128, 256 visual slots) so that cost follows m, and the loss runs the LM head over 256
positions at a time.
"""
import ml_collections

from mqt import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  knobs = config_lib.parse_knobs(arg, stage=2, variant="official")
  if knobs.stage not in (1, 2):
    raise ValueError(f"stage must be 1 or 2, got {knobs.stage}")
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  m = config.model
  m.dtype = "bfloat16"  # Compute dtype (float32: the exact path, as the parity tests).
  # Parameter dtype (--param_dtype): float32 (default) is exact; bfloat16 halves the memory
  # of parameters and imported weights (the 7B: 13.1 GiB instead of 26.3 GiB; an import
  # rounds each value once). Shapes come from the checkpoint when init.kind == "hf"
  # (convert.model_config_for_checkpoint); the values below are the 7B's defaults.
  m.param_dtype = "float32"
  m.image_token_id = -200  # LLaVA's IMAGE_TOKEN_INDEX placeholder id.
  m.train_vision = False  # CLIP is frozen in both stages.
  m.vision = ml_collections.ConfigDict(dict(
      image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096,
      ln_eps=1e-5, channels=3,
      select_layer=-2,  # hidden_states[-2]: the penultimate block, as LLaVA.
      keep_cls=False))  # LLaVA's "patch" feature: class token dropped.
  m.query = ml_collections.ConfigDict(dict(
      variant=knobs.variant,
      num_queries=256,  # M.
      heads=16,
      ln_eps=1e-6,
      depth=2, mlp_dim=4096, latent_attention="prefix"))  # perceiver only.
  m.llm = ml_collections.ConfigDict(dict(
      vocab_size=32000, width=4096, depth=32, heads=32, kv_heads=32, head_dim=128,
      mlp_dim=11008, rms_eps=1e-5, rope_theta=10000.0,
      scan_layers=True, remat_policy="full"))  # Gradient checkpointing, as the paper.

  config.sharding = ml_collections.ConfigDict()
  config.sharding.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.sharding.logical_axis_rules = config_lib.logical_axis_rules()

  # The paper's recipe. Paths are empty on purpose: set them
  # with --config.x=... (a missing one is an error that names the field).
  config_lib.run_block(config)
  config.run_stages = str(knobs.stage)
  config.data.max_len = 2048
  config.checkpoint.every = 500
  config.log_every = 10
  config.init.kind = "hf"  # Stage 1 starts from CLIP-L/336 and Vicuna-7B v1.5.
  # Both stages accumulate gradients over 2 micro-batches (the global batch is the
  # paper's): `train.py --dry_run` on CPU devices gives a peak per device of 7.7 GiB
  # (stage 1, 64 devices) and 41 GiB (stage 2, 8 devices, the largest m bucket); 11
  # and 58 GiB without.
  # Stage 1: LCS-558K captions, m = M, only the query transformer, lr 1e-3, batch 256, 1 epoch.
  config.stage1 = config_lib.stage_block(
      steps=2180, lr=1e-3, rules=config_lib.STAGE1_RULES, matryoshka_kind="fixed", m=256,
      accum_steps=2,
      data=config_lib.data_block(kind="json", template="plain", image_mode="crop",
                                 batch_size=256, group_by_modality=False))
  # Stage 2: the 665K mix, m uniform over even 2..256 per step, query transformer + LLM,
  # lr 2e-5, batch 128, 2 epochs; parameters from the stage-1 run. Three step shapes
  # (64, 128 and 256 visual slots): a step with m <= 64 runs 192 fewer sequence slots
  # than one with all M; about 4% fewer slots on average, for two more compiles.
  config.stage2 = config_lib.stage_block(
      steps=10390, lr=2e-5, rules=config_lib.STAGE2_RULES, matryoshka_kind="official",
      accum_steps=2, buckets=(64, 128),
      data=config_lib.data_block(kind="json", template="vicuna_v1", image_mode="pad",
                                 batch_size=128, group_by_modality=True))
  if knobs.stage == 2:
    # Set --config.stage2.init_from=<stage-1 workdir>/stage1/checkpoints.
    config.init.kind = "checkpoint"
  config.eval.ms = (2, 4, 8, 16, 36, 64, 144, 256)
  config.eval.data.kind = "json"
  return config
