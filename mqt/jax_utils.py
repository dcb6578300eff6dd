"""Small JAX utilities: compilation counting."""
import contextlib

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations inside the block.

  with count_compiles() as n:
    f(x); f(y)
  n() -> number of compilations (cache hits compile nothing).
  """
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _BACKEND_COMPILE:
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield lambda: count[0]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
