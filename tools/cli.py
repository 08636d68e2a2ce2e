"""What every tool shares: the console scripts' entry, a quiet TensorFlow start-up, one-line errors.

Each console script `tfsplit-<tool>` points at `main` here, which quiets TensorFlow's start-up and
only then imports `tfsplit_tools.<tool>` (a tool imports TensorFlow at its top) and runs its
`main` with `run`. `python -m tfsplit_tools.<tool>` makes the same two calls at the end of the tool
module, after its imports: there the quieting reaches only what is still to load, so TensorFlow's
load-time lines are printed (the console scripts are the quiet way to run a tool).

`quiet_tensorflow_startup(argv)`: below `--verbosity=1` (the default), TF_CPP_MIN_LOG_LEVEL=3,
which hides the CUDA, oneDNN and CPU-feature notices, and the lines that TensorFlow's shared
libraries write while loading, before they read that variable, are filtered to the same level;
`--verbosity=1` (`-v 1`) keeps TensorFlow's own level. An explicit TF_CPP_MIN_LOG_LEVEL in the
environment wins.

`run(main)`: absl's `app.run`, except that a user error ends the program with one line,
`<program>: error: <what was wrong>`, and status 2.

Importing this module has no side effect. It imports neither TensorFlow nor a tfsplit module that
does: tfsplit_tools.run_head runs on devices without TensorFlow.
"""

import contextlib
import ctypes
import functools
import importlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
import traceback

from absl import app, flags

try:  # Optional dependency: grpcio (a device that speaks REST to the tail may lack it).
    import grpc
except ImportError:
    grpc = None

# The tool modules, one per console script tfsplit-<name with "-" for "_">.
TOOLS = (
    "bench_data",
    "bench_head",
    "bench_leakage",
    "bench_network",
    "bench_server",
    "bench_train",
    "data_service",
    "device_train",
    "evaluate",
    "export",
    "infer",
    "prepare_data",
    "reproduce",
    "results_pages",
    "run_head",
    "serve",
    "train",
    "train_server",
)
# Library exceptions that mean bad input; the tfsplit ones (ExportError, DeviceError, PayloadError,
# DatasetFileError, ...) derive from ValueError.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)
USER_ERROR_STATUS = 2
# gRPC refusals the user can act on (a wrong token, a server down, out of reach or too slow, one
# that runs another config or is full), with what to say first; other codes keep their traceback.
_RPC_USER_ERRORS = {
    "UNAUTHENTICATED": "the server refused the token; check --token_file",
    "PERMISSION_DENIED": "the server refused the call",
    "UNAVAILABLE": "cannot reach the server; check --server and that the server runs",
    "DEADLINE_EXCEEDED": "the server did not answer in time",
    "FAILED_PRECONDITION": "the server refused the call",
    "RESOURCE_EXHAUSTED": "the server refused the call",
}
_RPC_ERRORS = (grpc.RpcError,) if grpc is not None else ()

_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
# The clone these tools run from (an editable install, or a run inside the repository): the folder
# above tools/. None for an installed copy (.../site-packages/tfsplit_tools).
CLONE_ROOT = os.path.dirname(_TOOLS_DIR) if os.path.basename(_TOOLS_DIR) == "tools" else None

_SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3
# absl C++ ("I0000 00:00:17.5  42 port.cc:153] ...") and TSL ("2025-01-01 10:00:00.1: I x.cc:1] ").
_CPP_LOG_LINE = re.compile(
    r"^(?:([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ |\d{4}-\d\d-\d\d [\d:.]+: ([IWEF]) )\S+:\d+\] "
)
_ABSL_PREINIT_WARNING = "WARNING: All log messages before absl::InitializeLog() is called"


# glibc's mallopt parameter: allocations above it get their own mapping, returned on free.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_buffers_to_the_os():
    """For the servers: glibc keeps freed heap memory for reuse, so a server that once received
    large messages (a refused batch, a fuzzer's) would hold that peak for good; buffers above
    `MMAP_THRESHOLD_BYTES` are mapped on their own instead, and freeing one returns it. An
    explicit MALLOC_MMAP_THRESHOLD_ in the environment wins. Returns whether it applied."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc only: elsewhere there is nothing to set
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


# --------------------------------------------------------------------------- quiet start-up


def _argv_verbosity(argv):
    """absl's --verbosity (-v) as given in `argv`, before flags are parsed; 0 if absent."""
    verbosity = "0"
    args = iter(argv[1:])
    for arg in args:
        if arg == "--":
            break
        match = re.fullmatch(r"--?(?:verbosity|v)(?:=(.*))?", arg)
        if match:
            verbosity = match.group(1) if match.group(1) is not None else next(args, "0")
    try:
        return int(verbosity)
    except ValueError:
        return 0  # absl reports the bad value when it parses the flags.


def _min_log_level():
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def _is_below_level(line, level):
    if line.startswith(_ABSL_PREINIT_WARNING):
        return level > 1
    match = _CPP_LOG_LINE.match(line)
    return bool(match) and _SEVERITIES.index(match.group(1) or match.group(2)) < level


@contextlib.contextmanager
def _stderr_filtered_to(level):
    """Holds what is written to file descriptor 2 and lets through lines at `level` or above."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _is_below_level(line, level)))
            sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader, level):
        self._loader = loader
        self._level = level

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        with _stderr_filtered_to(self._level):
            self._loader.exec_module(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Filters the log lines that TensorFlow's libraries write at load time, once."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, _min_log_level())
        return spec


def quiet_tensorflow_startup(argv):
    """Sets TensorFlow's C++ log level from `--verbosity` in `argv`, before flags are parsed.

    Below 1: TF_CPP_MIN_LOG_LEVEL=3 (unless set), and if TensorFlow is still to be imported, its
    load-time lines are filtered to that level when it is (a one-shot import hook). From 1 on:
    TensorFlow's own level. Call it before TensorFlow is imported; later it reaches what is still
    to load.
    """
    if _argv_verbosity(argv) >= 1:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    hooked = any(isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path)
    if "tensorflow" not in sys.modules and _min_log_level() > 0 and not hooked:
        sys.meta_path.insert(0, _QuietTensorFlowImport())


# --------------------------------------------------------------------------- one-line errors


def _one_line(error):
    """The gist of `error` on one line; a config file's traceback shrinks to its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    if "Traceback (most recent call last):" not in lines and not isinstance(error, OSError):
        return " ".join(lines)
    flag = re.match(r"flag --\S+?: ", lines[0])  # absl's "flag --name=value: ..."
    return (flag.group(0) if flag else "") + re.sub(r"^\w+(?:Error|Exception): ", "", lines[-1])


def _rpc_user_error(error):
    """One line for a gRPC refusal the user can act on; None for another (a bug: a traceback)."""
    code = error.code() if isinstance(error, grpc.Call) else None
    what = _RPC_USER_ERRORS.get(getattr(code, "name", None))
    if what is None:
        return None
    details = " ".join(line.strip() for line in (error.details() or "").splitlines())
    return f"{what} (gRPC {code.name}: {details or 'no details'})"


def _exit_with_user_error(program, message):
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.exit(USER_ERROR_STATUS)


def _unknown_override(error, argv):
    """`--config.x.nope=1` names no config field: ml_collections raises a bare AttributeError."""
    key = str(error).strip("\"'")
    for arg in argv[1:]:
        match = re.match(r"--?(?:no)?(\w+(?:\.\w+)+)", arg)
        if match and key in match.group(1).split(".")[1:]:
            return f"flag --{match.group(1)}: the config has no field {key!r}"
    return None


def _config_file_error(error, name=None):
    """One line for a config file that could not be loaded, naming its flag where known."""
    if name is None:  # ml_collections names the module it loads "<flag name>_config".
        match = re.search(r"Failed loading config file (\w+)_config", str(error))
        name = match.group(1) if match else None
    return (f"flag --{name}: " if name else "") + _one_line(error.__cause__ or error)


def _config_files_error():
    """A config file's load error, which ml_collections would raise at the config's first use."""
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if type(flag.parser).__module__.startswith("ml_collections.") and flag.value is not None:
            try:
                getattr(flag.value, "lock", None)
            except OSError as error:
                return _config_file_error(error, name)
    return None


def _parse_flags(program, argv):
    try:
        args = flags.FLAGS(argv)
    except flags.Error as error:  # illegal value, missing required flag, unknown flag
        _exit_with_user_error(program, _one_line(error))
    except OSError as error:  # a config file that cannot be loaded, met by an override
        _exit_with_user_error(program, _config_file_error(error))
    except (AttributeError, KeyError) as error:
        message = _unknown_override(error, argv)
        if message is None:
            raise
        _exit_with_user_error(program, message)
    message = _config_files_error()
    if message:
        _exit_with_user_error(program, message)
    return args


def _main_with_user_errors(program, main, argv):
    try:
        return main(argv)
    except (app.UsageError, *USER_ERRORS, *_RPC_ERRORS) as error:
        rpc = bool(_RPC_ERRORS) and isinstance(error, _RPC_ERRORS)
        message = _rpc_user_error(error) if rpc else _one_line(error)
        if message is None:
            raise
        if flags.FLAGS.verbosity >= 1:
            traceback.print_exc()
    _exit_with_user_error(program, message)


def _program_name(main):
    module = main.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else ""
    if module.startswith(f"{__package__}."):
        return "tfsplit-" + module.split(".", 1)[1].replace("_", "-")
    return os.path.basename(sys.argv[0])


def run(main):
    """Runs `main` as absl's `app.run` does, except that user errors end it with one line.

    A bad flag or config override, a config file that cannot be loaded, `app.UsageError`,
    `USER_ERRORS` and the gRPC refusals a user can act on (a wrong token, an unreachable server)
    raised by `main` print `<program>: error: <what was wrong>` to stderr and exit with status 2,
    without a traceback (`--verbosity=1` adds it); other exceptions keep theirs.
    """
    program = _program_name(main)
    app.run(
        functools.partial(_main_with_user_errors, program, main),
        flags_parser=functools.partial(_parse_flags, program),
    )


# --------------------------------------------------------------------------- entry and clone


def main():
    """Every console script's entry: `tfsplit-<tool>` runs tfsplit_tools.<tool>, quietly.

    The program's name picks the tool; start-up is quieted before the tool module (and with it
    TensorFlow) is imported.
    """
    program = os.path.basename(sys.argv[0])
    tool = program.removeprefix("tfsplit-").replace("-", "_")
    if not program.startswith("tfsplit-") or tool not in TOOLS:
        names = ", ".join("tfsplit-" + name.replace("_", "-") for name in TOOLS)
        _exit_with_user_error(program, f"not a tfsplit console script; those are {names}")
    quiet_tensorflow_startup(sys.argv)
    module = importlib.import_module(f"{__package__}.{tool}")
    _help_from(module)
    run(module.main)


def _help_from(module):
    """--help shows __main__'s docstring and the flags of the module named sys.argv[0] (absl); here
    __main__ is the console script's wrapper, so both come from the tool module instead."""
    sys.modules["__main__"].__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def clone_path(*parts):
    """A path inside the clone these tools run from, or relative to the working directory."""
    return os.path.join(CLONE_ROOT or os.curdir, *parts)


def import_benchmark(name):
    """`benchmarks.<name>` from the clone these tools run from: benchmarks/ is not installed.

    Puts the clone's root on sys.path (spawned processes inherit it).

    Raises:
      FileNotFoundError: these tools are an installed copy, or their clone has no benchmarks/.
    """
    if CLONE_ROOT is None or not os.path.isfile(
        os.path.join(CLONE_ROOT, "benchmarks", "__init__.py")
    ):
        raise FileNotFoundError(
            f"this tool needs a clone of tfsplit: benchmarks/ is not installed and there is none "
            f"beside {_TOOLS_DIR}; run it from a clone installed with `pip install -e .`"
        )
    if CLONE_ROOT not in sys.path:
        sys.path.insert(0, CLONE_ROOT)
    return importlib.import_module(f"benchmarks.{name}")
