"""What every command-line entry point (train.py, evaluate.py, predict.py, export.py)
does first, and the flags they share (defined once here, so importing several entry
points in one process never defines a flag twice).

`run(main)` starts an entry point: flags are parsed first (an unknown config key, a
malformed override or a bad config knob is one line naming it), then `main` runs; a
user error (bad flags, config, paths, data, a run that cannot fit or whose loss
diverged) ends as "error: <message>" on stderr with exit status 2 (usage or config)
or 1 (at run time), without a traceback; `--debug` shows the traceback instead.
"""
import difflib
import importlib.util
import re
import sys

from absl import app
from absl import flags
from absl import logging

DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile ahead of time on abstract parameters (no data, weights or "
    "parameters are read or allocated), print the memory per device and stop.")
PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", None, ["float32", "bfloat16"],
    "Parameter dtype (default: config.model.param_dtype). bfloat16 halves the memory of "
    "imported weights; float32 is the exact path.")
DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an error instead of the "
                          "one-line message.")

USAGE, RUNTIME = 2, 1  # Exit statuses.
CONFIG_FLAG = "config"


class UserError(Exception):
  """A problem with what the user asked for; `status`: the exit status (2: usage or
  config, 1: found at run time). The message may hold one problem per line."""

  def __init__(self, message: str, status: int = USAGE):
    super().__init__(message)
    self.status = status


def problems_error(problems, header: str = "", status: int = USAGE) -> UserError:
  """Several problem lines -> one UserError (a header line first when there are
  several, each problem on its own indented line)."""
  problems = list(dict.fromkeys(problems))
  if len(problems) == 1:
    return UserError(problems[0], status)
  head = f"{header} ({len(problems)} problems)" if header else f"{len(problems)} problems"
  return UserError(f"{head}:\n  " + "\n  ".join(problems), status)


class Problems:
  """Problems found before a run starts, collected so that all are reported at once."""

  def __init__(self):
    self.lines: list[str] = []

  def __bool__(self) -> bool:
    return bool(self.lines)

  def add(self, lines) -> None:
    """Adds a problem line, or a list of them."""
    self.lines += [lines] if isinstance(lines, str) else list(lines)

  def check(self, fn, *args, **kwargs):
    """fn(*args, **kwargs); a user error it raises becomes problem lines (-> None). A
    KeyError / TypeError / AttributeError after a problem was found is taken as its
    consequence (dropped); before, it is a bug and propagates."""
    try:
      return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError, UserError, app.UsageError) as e:
      self.add(problem_lines(e))
    except (KeyError, TypeError, AttributeError, IndexError):
      if not self.lines:
        raise
    return None

  def raise_if_any(self, header: str = "this run cannot start") -> None:
    """Raises a UserError (exit status 2) naming every problem, if there is any."""
    if self.lines:
      raise problems_error(self.lines, header)


def problem_lines(error: BaseException) -> list[str]:
  """An error's message -> its problems: the indented lines under a "...:" header line
  (as mqt.run_inputs.check_paths and mqt.run_inputs.resolve_paths write them), else the
  message itself."""
  lines = [x for x in str(error).splitlines() if x.strip()]
  if len(lines) > 1 and lines[0].rstrip().endswith(":"):
    return [x.strip() for x in lines[1:]]
  return ["\n".join(lines)] if lines else [type(error).__name__]


# ---------------------------------------------------------------------------
# Errors that end a run with a message, not a traceback.

def _user_status(error: BaseException) -> int | None:
  """The exit status for a user error; None for anything else (a bug: traceback)."""
  from mqt import preemption  # pylint: disable=import-outside-toplevel
  if isinstance(error, preemption.Preempted):
    return preemption.EXIT_STATUS  # Stopped on request, checkpoint written: rerun to resume.
  if isinstance(error, UserError):
    return error.status
  if isinstance(error, app.UsageError):
    return USAGE
  if isinstance(error, (ValueError, OSError, FloatingPointError)):
    return RUNTIME  # Bad input, a file that cannot be read or written, a diverged run.
  if isinstance(error, MemoryError) and (type(error) is not MemoryError or str(error)):
    return RUNTIME  # A planned check's message, not Python running out of memory.
  return None


def fail(message: str, status: int, prefix: str = "error: ") -> None:
  """Prints "error: <message>" (its lines kept) on stderr and exits with `status`."""
  sys.stdout.flush()
  sys.stderr.write(f"{prefix}{message}\n")
  sys.stderr.flush()
  sys.exit(status)


def guarded(main):
  """main(argv) -> main whose user errors end in `fail` (unless --debug)."""
  def run_main(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      status = _user_status(e)
      if status is None or (flags.FLAGS.is_parsed() and DEBUG.value):
        raise
      from mqt import preemption  # pylint: disable=import-outside-toplevel
      stopped = isinstance(e, preemption.Preempted)  # Not an error: a requested stop.
      fail(str(e) or type(e).__name__, status, prefix="stopped: " if stopped else "error: ")
  return run_main


def run(main) -> None:
  """The one way every entry point starts: `cli.run(main)` instead of `app.run(main)`."""
  app.run(guarded(main), flags_parser=parse_flags)


# ---------------------------------------------------------------------------
# Flag parsing: the config file, its knobs and overrides checked first.

def _config_arg(argv) -> str | None:
  """The value of --config in argv (None when absent)."""
  for i, arg in enumerate(argv):
    found = re.match(rf"^--?{CONFIG_FLAG}(=(.*))?$", arg)
    if found:
      if found.group(1) is not None:
        return found.group(2)
      return argv[i + 1] if i + 1 < len(argv) else None
  return None


def _overrides(argv) -> list[tuple[str, str]]:
  """(the argument, the field path) of every --config.<path>[=value] in argv."""
  out = []
  for arg in argv:
    if arg == "--":
      break
    found = re.match(rf"^--?(?:no)?{CONFIG_FLAG}\.([^=]+)", arg)
    if found:
      out.append((arg, found.group(1)))
  return out


def load_config_file(value: str):
  """--config's value ("path.py[:knobs]") -> get_config(knobs), as ml_collections loads it.
  Raises UserError naming the file or the knob."""
  path, _, knobs = value.partition(":")
  spec = importlib.util.spec_from_file_location("_mqt_cli_config", path) if path else None
  if spec is None or not path.endswith(".py"):
    raise UserError(f"--{CONFIG_FLAG}={value}: {path or '(empty)'} is not a Python config "
                    f"file (e.g. configs/tiny.py)")
  try:
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except FileNotFoundError:
    raise UserError(f"--{CONFIG_FLAG}={value}: no such file {path}") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"--{CONFIG_FLAG}={value}: {path} defines no get_config()")
  try:
    return module.get_config(knobs) if ":" in value else module.get_config()
  except (ValueError, TypeError, KeyError) as e:
    raise UserError(f"--{CONFIG_FLAG}={value}: {e}") from None


def config_keys(config, prefix: str = "") -> list[str]:
  """Every field path of a ConfigDict, nested blocks included ("model", "model.llm", ...)."""
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if hasattr(value, "items") and not isinstance(value, dict):
      keys += config_keys(value, f"{prefix}{key}.")
  return keys


def unknown_key_problems(config, paths, source: str) -> list[str]:
  """One line per path in `paths` that `config` lacks, with its close matches."""
  keys = config_keys(config)
  known = set(keys)
  problems = []
  for path in dict.fromkeys(paths):
    bare = re.sub(r"\[[^\]]*\]", "", path)
    if bare in known:
      continue
    close = difflib.get_close_matches(bare, keys, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(close)}?" if close else
            f"see the fields in {source.partition(':')[0]}")
    problems.append(f"--{CONFIG_FLAG}.{path}: unknown config key {bare!r} in {source}; {hint}")
  return problems


def _flag_error_text(error: Exception) -> str:
  """absl / ml_collections flag errors -> one line naming the flag."""
  text = " ".join(str(error).split())
  text = re.sub(r"^flag (--\S+?): ", r"\1: ", text)
  text = re.sub(r"invalid literal for int\(\) with base 10: (\S+)", r"\1 is not an integer",
                text)
  text = re.sub(r"could not convert string to float: (\S+)", r"\1 is not a number", text)
  found = re.search(r"Flag --(\S+) must have a value other than None", text)
  if found:
    return f"--{found.group(1)} is required"
  return text


def flag_problems(argv) -> list[str]:
  """What is wrong with --config (its file, knobs, override keys) in argv, checked
  before absl parses the flags: [] when nothing is."""
  value = _config_arg(argv)
  overrides = _overrides(argv)
  if value is None:
    return []
  try:
    config = load_config_file(value)
  except UserError as e:
    return [str(e)]
  if not hasattr(config, "items"):
    return []
  return unknown_key_problems(config, [p for _, p in overrides], f"--{CONFIG_FLAG}={value}")


def parse_flags(argv) -> list[str]:
  """app.run's flags_parser: the config's file, knobs and keys are checked first (every
  problem named), then absl parses; an error is one line ("error: ...", exit 2)."""
  debug = any(re.match(r"^--?debug(=(true|1))?$", a, re.I) for a in argv[1:])
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    problems = flag_problems(argv)
    if problems:
      raise problems_error(problems, "the command line has problems")
    return flags.FLAGS(argv)
  except UserError as e:
    if debug:
      raise
    fail(str(e), e.status)
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError, IOError) as e:
    if debug:
      raise
    fail(_flag_error_text(e), USAGE)
  return []  # Not reached.


# ---------------------------------------------------------------------------
# Helpers of the entry points.

def start(argv) -> None:
  """Rejects stray arguments; quiets library INFO logs unless --verbosity was given
  (progress lines are printed, not logged)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def apply_param_dtype(config):
  """--param_dtype, when given, overrides config.model.param_dtype (returns config)."""
  if PARAM_DTYPE.value is not None:
    with config.unlocked():
      config.model.param_dtype = PARAM_DTYPE.value
  return config


def define_model_flags():
  """--config, --workdir and --checkpoint of the commands that load a trained model
  (evaluate.py, predict.py, maps.py); call once, at import of the command.
  -> their flag holders (config, workdir, checkpoint)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config = config_flags.DEFINE_config_file(CONFIG_FLAG, None, "Config file (get_config(arg)).",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "The training workdir (checkpoints, data).")
  checkpoint = flags.DEFINE_string("checkpoint", "", "An orbax checkpoints folder, or 'hf' to "
                                   "import config.init's HF weights (default: the last stage "
                                   "of --workdir).")
  return config, workdir, checkpoint


def user_settings() -> set[str]:
  """The config fields set on the command line (`--config.model.llm.depth=40` ->
  "model.llm.depth"); empty where no --config flag was parsed."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  holder = flags.FLAGS[CONFIG_FLAG] if CONFIG_FLAG in flags.FLAGS else None
  if holder is None or not holder.present:
    return set()
  try:
    return set(config_flags.get_override_values(holder))
  except (TypeError, AttributeError):  # Not a config flag, or not parsed yet.
    return set()


def int_list(flag: str, values) -> tuple[list[int], list[str]]:
  """A list flag's items (e.g. --ms=1,2,x) -> (the integers, one problem per bad item)."""
  out, problems = [], []
  for item in values or ():
    text = str(item).strip()
    try:
      out.append(int(text))
    except ValueError:
      problems.append(f"--{flag}={','.join(map(str, values))}: {text!r} is not an integer")
  return out, problems
