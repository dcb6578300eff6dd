"""The jitted train step: Matryoshka forward passes, a chunked loss, accumulation.

`make_train_step` returns step(state, batch, ms) -> (state, metrics). The train
state is a plain pytree {"params", "opt_state", "step"}; only the trainable
parameters (optimizer rules) are differentiated, and the step's m values `ms` [K]
are data, so one program serves every m of its bucket.
"""
import jax
import jax.numpy as jnp
import optax

from mqt import layers
from mqt import optim
from mqt.model import MQTLLaVA, chunked_next_token_loss


def all_finite(tree) -> jax.Array:
  """bool scalar: every floating-point value of `tree` is finite (one reduction per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


LOSS_CHUNK = 256  # Positions per chunk of the LM head + log-softmax in the train step.


def make_train_step(model: MQTLLaVA, tx, labels, accum_steps: int,
                    loss_chunk: int = LOSS_CHUNK, num_latents: int | None = None):
  """-> step(state, batch, ms) -> (state, metrics).

  num_latents: the step's bucket (`matryoshka.MSampler.bucket`): the query transformer
  runs that many latents and the LLM T + num_latents - 1 slots; every m in ms must be
  at most num_latents. None: all M.

  metrics: loss, grad_norm, tokens, and params_finite / opt_state_finite (bool: the new
  trainable parameters / optimizer state hold only finite values; the loop adopts
  and saves no state where either is False).

  The loss never holds float32 logits for every position (`chunked_next_token_loss`);
  micro-batch k of an accumulated step holds rows k, k + A, k + 2A, ... (A =
  accum_steps), so each device keeps its own rows of the batch."""

  def micro_loss(trainable, frozen, micro, ms):
    params = optim.combine(trainable, frozen)
    head = lambda x: model.apply({"params": params}, x, method=MQTLLaVA.head)
    total, count = 0.0, 0
    for k in range(ms.shape[0]):  # K is static: one forward per m of a `list` step.
      hidden, layout = model.apply({"params": params}, micro["images"], micro["input_ids"],
                                   micro["text_mask"], ms[k], num_latents=num_latents,
                                   return_hidden=True)
      _, aux = chunked_next_token_loss(head, hidden, layout, micro["labels"], loss_chunk)
      total, count = total + aux["loss_sum"], aux["tokens"]
    return total, count

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch, ms):
    trainable, frozen = optim.partition(state["params"], labels)
    split = lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps,
                                *x.shape[1:]).swapaxes(0, 1)
    micros = {k: split(batch[k]) for k in ("images", "input_ids", "text_mask", "labels")}

    def body(carry, micro):
      g_acc, s_acc, n_acc = carry
      micro = {k: layers.constrain(v, ("batch",) + (None,) * (v.ndim - 1))
               for k, v in micro.items()}
      (s, n), g = grad_fn(trainable, frozen, micro, ms)
      return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    if accum_steps == 1:
      (g, s, n), _ = body((zeros, 0.0, 0), jax.tree.map(lambda x: x[0], micros))
    else:
      (g, s, n), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.int32(0)), micros)
    denom = jnp.maximum(n, 1).astype(jnp.float32) * ms.shape[0]
    grads = jax.tree.map(lambda x: x / denom, g)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = {"params": optim.combine(trainable, frozen), "opt_state": opt_state,
                 "step": state["step"] + 1}
    return new_state, {"loss": s / denom, "grad_norm": optax.tree.norm(grads), "tokens": n,
                       "params_finite": all_finite(trainable),
                       "opt_state_finite": all_finite(opt_state)}

  return step
