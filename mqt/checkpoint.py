"""orbax checkpoints of the train state, the data iterator and the run's records.

A checkpoint holds `state` (params, opt_state, step, rng), `data` (the data
iterator's position, JSON) and `run` (what the run's summary needs: the last
losses, counters, the data ledger; JSON). Checkpoints written before `run`
existed restore without it.

Saves are asynchronous; orbax writes into a temporary directory and renames it
when complete, so an interrupted save is never listed as a checkpoint: resuming
always starts from the last whole one. A finished checkpoint that cannot be read
(a truncated or deleted file) is moved aside to `<step>.corrupt-<n>` once an
older one restores (`restore_latest`). A failed write (disk full, file-size
limit) becomes one `CheckpointWriteError` naming the step, the folder, the
system's reason and the last good checkpoint; orbax's own error reports of it
(logged from its background threads) are held back.

The params alone (another stage's or run's, for init_from or export) are read with
`restore_params` (any subset of leaves, onto the target shardings or into host
memory); `latest_step` and `params_metadata` say what a folder holds without reading it.
"""
import logging as py_logging
import os
import re
import sys

import jax
import orbax.checkpoint as ocp

from mqt import paths

ITEMS = ("state", "data", "run")


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (the message names step, folder and reason)."""


class CheckpointRestoreError(ValueError):
  """A checkpoint (or every checkpoint of a folder) cannot be restored; the message names
  the path. `reason`: why, in one line."""

  def __init__(self, message: str, reason: str = ""):
    super().__init__(message)
    self.reason = reason


def os_error_reason(exc: BaseException) -> str | None:
  """The operating system's reason for a failed write, found in `exc` or its chain: an
  OSError's strerror, or the error code tensorstore puts in its messages
  ("[os_error_code='27']"); None when the failure is not an I/O error."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
      return exc.strerror or os.strerror(exc.errno)
    code = re.search(r"os_error_code='?(\d+)", str(exc))
    if code:
      return os.strerror(int(code.group(1)))
    exc = exc.__cause__ or exc.__context__
  return None


def short_reason(exc: BaseException, limit: int = 300) -> str:
  """One line saying why a restore failed: the innermost message of the chain (orbax
  wraps tensorstore's precise error in a long generic one), cut to `limit` chars."""
  messages, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc).strip().splitlines()
    messages.append(f"{type(exc).__name__}: {text[0] if text else ''}")
    exc = exc.__cause__ or exc.__context__
  line = messages[-1]
  return line if len(line) <= limit else line[:limit - 3] + "..."


class _HoldOrbaxErrors(py_logging.Filter):
  """Holds back what orbax's background save threads report on their own when a write
  fails: its ERROR log records (with tracebacks), asyncio's "Task exception was never
  retrieved" for the failed writes, and the "Event loop is closed" errors of writes
  that finish after orbax closed their event loop (unraisable exceptions). The failure
  reaches the caller as one CheckpointWriteError instead; `held` keeps them."""

  def __init__(self):
    super().__init__()
    self.held = []
    self._previous_hook = None

  def filter(self, record):
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    failed_write = (record.name == "asyncio" and record.exc_info
                    and os_error_reason(record.exc_info[1]) is not None)
    if record.levelno >= py_logging.ERROR and (from_orbax or failed_write):
      self.held.append(record.getMessage().splitlines()[0])
      return False
    return True

  def _unraisable(self, unraisable):
    """Holds errors raised where nothing can catch them (finalizers, loop callbacks) by
    orbax's write tasks; no imports here (this also runs at interpreter shutdown)."""
    value, tb = unraisable.exc_value, unraisable.exc_traceback
    in_orbax = f"{os.sep}orbax{os.sep}" in repr(unraisable.object)
    while tb is not None and not in_orbax:
      in_orbax = f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename
      tb = tb.tb_next
    if in_orbax or (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      self.held.append(f"{type(value).__name__}: {value}")
    else:
      self._previous_hook(unraisable)

  def install(self):
    for name in ("absl", "asyncio"):
      py_logging.getLogger(name).addFilter(self)
    self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

  def uninstall(self):
    for name in ("absl", "asyncio"):
      py_logging.getLogger(name).removeFilter(self)
    if sys.unraisablehook == self._unraisable:  # pylint: disable=comparison-with-callable
      sys.unraisablehook = self._previous_hook


class Checkpointer:
  """A stage's checkpoints folder. `name` (e.g. "stage1") prefixes error messages."""

  def __init__(self, directory: str, every: int, keep: int, use_async: bool = True,
               name: str = ""):
    self.directory = paths.absolute(directory)  # A gs:// (or other) URI stays as given.
    self.every = every
    self.name = name
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=use_async, cleanup_tmp_directories=True))
    self._pending = None  # The step of an asynchronous save that may still be writing.
    self._failed = False
    self._closed = False
    self._hold = _HoldOrbaxErrors()
    self._hold.install()

  # -- What is on disk.

  def step_path(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def finished_steps(self) -> list[int]:
    """The steps whose checkpoint was completely written (renamed from orbax's temporary
    folder), read from the disk, ascending."""
    if not paths.isdir(self.directory):
      return []
    return sorted(int(n) for n in paths.listdir(self.directory)
                  if n.isdigit() and paths.isdir(paths.join(self.directory, n)))

  def last_good_step(self, before: int | None = None) -> int | None:
    """The newest finished checkpoint (below `before` if given), after any pending save
    ended; None if there is none."""
    self._wait_quietly()
    steps = [s for s in self.finished_steps() if before is None or s < before]
    return steps[-1] if steps else None

  # -- Saving.

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, ..., force)` writes a checkpoint."""
    return force or (self.every > 0 and step % self.every == 0)

  def save(self, step: int, state, data_state: dict | None, force: bool = False,
           run_state: dict | None = None) -> bool:
    """Saves at multiples of `every` (or when `force`); -> whether it saved.

    Raises CheckpointWriteError when this save, or the asynchronous one before it
    (orbax reports those here), fails to write."""
    if not self.due(step, force):
      return False
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    if run_state is not None:
      args["run"] = ocp.args.JsonSave(run_state)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # pylint: disable=broad-except
      failed = self._pending if (self._pending is not None
                                 and self._pending not in self.finished_steps()) else step
      raise self._write_error(e, failed) from e
    self._pending = step if saved else self._pending
    return saved

  def wait(self):
    """Waits for the pending save; raises CheckpointWriteError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e, self._pending) from e
    self._pending = None

  def _write_error(self, exc: Exception, step: int | None) -> Exception:
    """`exc` as a CheckpointWriteError if it is a failed write; else `exc` itself."""
    reason = os_error_reason(exc)
    if reason is None:
      return exc
    self._failed = True
    good = self.last_good_step(before=step)
    prefix = f"[{self.name}] " if self.name else ""
    last = (f"the last good checkpoint is step {good} ({self.step_path(good)})"
            if good is not None else "no checkpoint of it was written before")
    return CheckpointWriteError(
        f"{prefix}cannot write the checkpoint of step {step} in {self.directory}: {reason}; "
        f"{last}")

  def _wait_quietly(self):
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      self._failed = True

  # -- Restoring.

  def restore(self, step: int, abstract_state, with_data: bool = True):
    """-> (state, data state or None). abstract_state: ShapeDtypeStructs carrying the
    target shardings. A failure names the checkpoint's path."""
    items = self.restore_items(step, abstract_state, with_data)
    return items["state"], items.get("data")

  def restore_items(self, step: int, abstract_state, with_data: bool = True) -> dict:
    """-> {"state": ..., "data": ... (if saved and with_data), "run": ... (if saved)}.

    Raises CheckpointRestoreError naming the step's path and the reason."""
    path = self.step_path(step)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data and paths.isdir(paths.join(path, "data")):
      args["data"] = ocp.args.JsonRestore()
    if paths.isdir(paths.join(path, "run")):
      args["run"] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
      return {k: out[k] for k in args}
    except Exception as e:  # pylint: disable=broad-except
      reason = short_reason(e)
      raise CheckpointRestoreError(f"{path}: cannot be restored ({reason})", reason) from e

  def restore_latest(self, abstract_state, say=print):
    """Restores the newest checkpoint that can be read; -> (step, items) or None when the
    folder holds none. Each newer one that cannot be read is moved aside once an older
    one restores (one line each through `say`). If none restores, nothing is moved and
    CheckpointRestoreError names the folder."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
      try:
        items = self.restore_items(step, abstract_state)
      except CheckpointRestoreError as e:
        bad.append((step, e.reason))
        continue
      for k, (bad_step, reason) in enumerate(bad):
        moved = self._move_aside(bad_step)
        nxt = bad[k + 1][0] if k + 1 < len(bad) else step
        say(f"{self.step_path(bad_step)}: cannot be restored ({reason}); moved aside to "
            f"{moved}, trying step {nxt}")
      if bad:
        self.manager.reload()
      return step, items
    if bad:
      listed = "; ".join(f"step {s}: {r}" for s, r in bad)
      raise CheckpointRestoreError(
          f"no checkpoint in {self.directory} can be restored ({listed}); move the folder "
          f"aside to start this stage afresh")
    return None

  def _move_aside(self, step: int) -> str:
    """Renames the step's folder to `<path>.corrupt-<n>` (the first free n), so orbax
    neither lists it nor writes over it; -> the new path."""
    path = self.step_path(step)
    n = 1
    while paths.exists(f"{path}.corrupt-{n}"):
      n += 1
    if jax.process_index() == 0:
      paths.rename(path, f"{path}.corrupt-{n}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"mqt: {path} moved aside")
    return f"{path}.corrupt-{n}"

  # -- Closing.

  def close(self, quiet: bool = False):
    """Waits for the pending save and closes. Raises CheckpointWriteError if that save
    failed, unless `quiet` (a run already stopping for another error) or a write error
    was already raised. After a write error, orbax's late reports of it stay held back
    (the process is ending with that error)."""
    if self._closed:
      return
    self._closed = True
    try:
      if quiet or self._failed:
        self._wait_quietly()
      else:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not (quiet or self._failed):
          raise
      finally:
        self._release_held()

  def _release_held(self):
    """Without a write error, what orbax reported on its own is logged as one warning
    (nothing is lost) and the hold ends."""
    if self._failed:
      return
    self._hold.uninstall()
    if self._hold.held:
      py_logging.getLogger("absl").warning(
          "orbax reported %d error(s) in the background of %s; the first: %s",
          len(self._hold.held), self.directory, self._hold.held[0])
    self._hold.held.clear()


# ---------------------------------------------------------------------------
# The params of a checkpoint on their own (a later stage's or run's init_from, export).

def all_steps(directory: str) -> list[int]:
  """The steps of the checkpoints folder `directory`, oldest first ([] when it holds none
  or does not exist); nothing is created."""
  if not paths.isdir(directory):
    return []
  with ocp.CheckpointManager(paths.absolute(directory),
                             options=ocp.CheckpointManagerOptions(create=False)) as manager:
    return sorted(manager.all_steps())


def latest_step(directory: str) -> int | None:
  """The newest step of the checkpoints folder `directory`; None when it holds none (or
  does not exist)."""
  if not paths.isdir(directory):
    return None
  with ocp.CheckpointManager(paths.absolute(directory)) as manager:
    return manager.latest_step()


def params_metadata(directory: str, step: int):
  """The metadata tree of the params saved at `step` (leaves with .shape and .dtype), read
  without the values; None when that step's state holds no params."""
  with ocp.CheckpointManager(paths.absolute(directory),
                             item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                             options=ocp.CheckpointManagerOptions(create=False)) as manager:
    meta = manager.item_metadata(step)["state"]
  tree = getattr(meta, "tree", meta)
  return tree.get("params") if isinstance(tree, dict) else None


def restore_params(directory: str, target, step: int | None = None):
  """The params of checkpoint `step` (None: the newest) in the folder `directory`, only
  the leaves `target` has (a partial restore): `target` is the params tree, or a subtree
  (e.g. {"vision": ..., "query": ...}), of ShapeDtypeStructs; -> a tree like it. A leaf
  with a sharding is read straight onto its devices, whatever topology saved it; one
  without (sharding None) comes back as a host numpy array. Each is cast on read to its
  target dtype. Raises CheckpointRestoreError (a ValueError) when the folder does not
  exist or holds no checkpoint."""
  if not paths.isdir(directory):
    raise CheckpointRestoreError(f"init_from checkpoint directory {directory} does not exist")
  with ocp.CheckpointManager(paths.absolute(directory)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointRestoreError(f"no checkpoint in {directory}")
    item = {"params": target}
    # restore_args carry the target shardings (without them orbax keeps the saved placement).
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
  return out["state"]["params"]
