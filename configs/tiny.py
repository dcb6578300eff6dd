r"""A CPU-sized MQT-LLaVA: the project's built-in default.

Same structure as configs/mqt_llava.py (CLIP-style tower, the official query
transformer, LLaMA decoder with grouped-query attention), small enough to
train on two CPU cores in about 9 minutes.

  python train.py --config=configs/tiny.py

Knobs after `:`: variant (official|perceiver).

What differs from the paper's recipe, and why: the towers start random, not
from pretrained CLIP and Vicuna, so
(1) the vision tower trains in stage 1 (a random, frozen tower would give the
    query transformer nothing worth pooling), and stage 1 trains the LLM too
    (a frozen random LLM cannot learn to caption);
(2) M = 9 latents on 72 px images with 24 px patches: the 3x3 patches are the
    synthetic scenes' 3x3 cells (objects are centred in them), so the tower sees
    each object whole in one patch; and the query transformer starts with
    `spatial_init_gap` = 6, so latent j pools patch j (0.99 of its weight,
    measured) and keeps doing so through stage 1. With the random shared init
    (`spatial_init` alone) every latent is a near-uniform blur of all nine cells
    (0.15-0.2 on its own cell, 0.11 uniform); the LLM then reads only a pooled
    summary of the image, and accuracy did not depend on m at all;
(3) stage 2 asks one question per sample with the `qa` template: no system
    prompt, the image after the question (the conversations of the built-in
    data are split into their rounds, `split_rounds`). The visual tokens can then
    attend to the question. With ideal visual tokens (bench/oracle_slots.py
    --template=qa --split_rounds, 3,000 steps) held-out colour / exist / short
    reach 0.95 / 0.86 / 0.53 at step 1,000 and 1.00 / 0.99 / 0.92 at 3,000 this
    way, against 0.83 / 0.69 / 0.56 and 0.99 / 0.97 / 0.83 with the image first
    (one question per sample in both); in the real pipeline (GPU, depth-4 LLM,
    4,000 steps) exist 1.00 against 0.84 and short 0.81 against 0.59;
(4) stage 2 starts the LLM afresh (`reinit`) and trains it alone, the tower
    and the query transformer frozen: the stage-1 LLM learnt to read the latents
    in reading order for captions, a poor start for finding the one a question
    names. Same stage-1 checkpoint, 1,000 stage-2 steps, m = M: colour at m = 9
    0.64 from the stage-1 LLM with everything training, 0.63 with the towers
    frozen, 0.66 with a fresh LLM and everything training, 0.82 with both;
(5) m is drawn uniformly from 1..M in stage 2 (the paper: the even numbers
    2..M, which for M = 9 never includes 9);
(6) lr 1e-3 in both stages (a small model from scratch, not a 7B fine-tune;
    3e-3 learned slower), and sequence lengths per stage (64 tokens);
(7) about 2,900 steps on CPU instead of GPU-days.

The tower's position embeddings start as CLIP's do (std 0.02). Trained from
scratch, its tokens then barely say where they are (bench/latent_probe.py on the
stage-1 checkpoint: an object's column 0.45 from its visual token, chance 0.33;
the row 0.49 comes mostly from the background's vertical gradient);
`vision.posemb_init="sincos2d"` makes it 0.93, but stage 2 learnt no more from
that (position still at chance; colour and exist lower in the one run), and
position questions alone teach a fresh LLM to read position from either
tower's latents equally slowly (README, "What is still open").
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
      ln_eps=1e-5, channels=3, select_layer=-2, keep_cls=False, posemb_init="normal"))
  m.query = ml_collections.ConfigDict(dict(
      variant=knobs.variant, num_queries=9, heads=4, ln_eps=1e-6,
      depth=1, mlp_dim=128, latent_attention="prefix",
      # official only (see above):
      spatial_init=knobs.variant == "official",
      spatial_init_gap=6.0 if knobs.variant == "official" else 0.0))
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
  config.data.max_len = 64  # One question (<= 51 text tokens) + 9 visual tokens.
  config.data.builtin_image_size = 72
  config.checkpoint.every = 200
  config.log_every = 50
  every_part = (("^query/", 1.0), ("^llm/", 1.0), ("^vision/", 1.0))
  config.stage1 = config_lib.stage_block(
      steps=900, lr=1e-3, rules=every_part, matryoshka_kind="fixed", m=0,
      data=config_lib.data_block(split="captions", template="plain", image_mode="pad",
                                 batch_size=32, group_by_modality=False, max_len=64))
  llm_only = (("^llm/", 1.0), ("^query/", None), ("^vision/", None))
  config.stage2 = config_lib.stage_block(
      steps=2000, lr=1e-3, rules=llm_only, matryoshka_kind="uniform",
      data=config_lib.data_block(split="instruct", template="qa", image_mode="pad",
                                 batch_size=32, group_by_modality=True, split_rounds=True))
  config.stage2.reinit = "^llm/"
  config.eval.ms = (1, 2, 4, 6, 9)
  config.eval.data.template = "qa"
  return config
