"""orbax checkpoints of the train state and the data iterator.

A checkpoint holds `state` (params, opt_state, step, rng) and `data` (the
grain iterator state, JSON). Saves are asynchronous; orbax writes into a
temporary directory and renames it when complete, so an interrupted save is
never listed as a checkpoint: resuming always starts from the last whole one.
"""
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, every: int, keep: int, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=use_async, cleanup_tmp_directories=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    if not force and (self.every <= 0 or step % self.every):
      return False
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state, with_data: bool = True):
    """abstract_state: ShapeDtypeStructs carrying the target shardings."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      args["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], (out["data"] if with_data else None)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """Concrete (sharded) arrays -> ShapeDtypeStructs with the same shardings."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
