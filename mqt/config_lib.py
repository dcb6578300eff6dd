"""Helpers for `get_config(arg)` files: structural knobs after `:`.

`--config=configs/mqt_llava.py:stage=2,variant=perceiver` passes the text
after `:` to `get_config`, which parses it here against its declared knobs.
An unknown knob or a value of the wrong type is an error that names it.
"""
import ml_collections


def parse_knobs(arg: str | None, **defaults):
  """Parses "k=v,k2=v2" into a ConfigDict over `defaults` (types from defaults)."""
  knobs = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"config knob {item!r} is not of the form key=value")
    if key not in defaults:
      raise ValueError(f"unknown config knob {key!r}; known knobs: {sorted(defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        knobs[key] = value.lower() in ("true", "1")
      else:
        knobs[key] = kind(value)
    except ValueError:
      raise ValueError(f"config knob {key}={value!r} is not a valid {kind.__name__}") from None
  return ml_collections.ConfigDict(knobs)


def logical_axis_rules():
  """Default logical-axis -> mesh-axis table (maxtext-style FSDP + tensor)."""
  return (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("vis_embed", "fsdp"),
      ("llm_embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", "tensor"),
      ("vocab", "tensor"),
      ("latents", None),
      ("layers", None),
  )
