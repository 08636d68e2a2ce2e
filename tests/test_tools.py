"""The console scripts as users run them: a user error is one stderr line and exit status 2.

Every case is a subprocess running the installed console script (`tfsplit-<tool>`, from
`pip install -e .`), as from a shell: the tools' absl flags would clash in one process, and only
the console scripts quiet TensorFlow's start-up (`python -m tfsplit_tools.<tool>` imports it before
the tool can). Each fails before any training, so a case costs about one TensorFlow import; the
cases run two at a time.
"""

import ast
import concurrent.futures
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO_ROOT / "configs" / "sl.py") + ":smoke"
TF_NOISE = re.compile(r"onednn|cuinit|cuda|absl::InitializeLog|cpu instructions", re.IGNORECASE)
# absl's Python log lines ("I1204 22:48:29.008761 1396 train.py:51] ..."): not the error line.
ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
# How long tfsplit-train may retry an unreachable server in the test (--retry_for_s), and the
# whole run's bound: well below the default retry of 120 s.
RETRY_FOR_S, UNREACHABLE_BOUND_S = 1, 90

# case -> (tool, argv with {tmp} for a scratch directory, what the one line must name)
CASES = {
    "train": ("train", ["--config={tmp}/missing.py", "--workdir={tmp}/run"], "missing.py"),
    "train-unknown-key": (
        "train",
        [f"--config={SMOKE}", "--config.nope=1", "--workdir={tmp}/run"],
        "--config.nope",
    ),
    "bench_train": (
        "bench_train",
        [f"--config={SMOKE}", "--config.data.batch_size=abc", "--workdir={tmp}"],
        "--config.data.batch_size=abc",
    ),
    "evaluate": ("evaluate", ["--workdir={tmp}/missing"], "missing"),
    "export": ("export", ["--workdir={tmp}", "--version=0"], "--version=0"),
    "infer": ("infer", ["--export_dir={tmp}/missing"], "missing"),
    "reproduce": ("reproduce", ["--workdir={tmp}/run", "--configs_dir={tmp}/missing"], "missing"),
    "serve": ("serve", ["--model_base_path={tmp}/missing", "--model_name=tail"], "missing"),
    "serve-tls-cert-without-key": (
        "serve",
        ["--model_base_path={tmp}/missing", "--model_name=tail", "--tls_cert={tmp}/server.crt"],
        "--tls_key",
    ),
    "run_head": ("run_head", ["--head={tmp}/missing.tflite", "--images=a.png"], "missing.tflite"),
    "run_head-required-flag": ("run_head", ["--images=a.png"], "--head"),
    "run_head-token-file": (
        "run_head",
        ["--head={tmp}/missing.tflite", "--images=a.png", "--token_file={tmp}/missing_token"],
        "missing_token",
    ),
    "bench_head": ("bench_head", ["--export_dir={tmp}/missing"], "missing"),
    "bench_head-unknown-flag": ("bench_head", ["--export_dir={tmp}", "--bogus"], "bogus"),
}
VERBOSE = ("evaluate", ["--workdir={tmp}/missing", "-v", "1"])
# A benchmark tool run outside the clone: it finds benchmarks/ beside the tools it was loaded from.
PLAN = ("bench_network", ["--plan_only", "--workdir={tmp}/plan", "--train_size=64"])


def _environment():
    # The test process's TF_CPP_MIN_LOG_LEVEL (set by importing tfsplit) would override the tools'.
    return {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}


def console_script(tool):
    """The installed console script of `tool` (bench_head -> .../bin/tfsplit-bench-head)."""
    path = pathlib.Path(sysconfig.get_path("scripts")) / f"tfsplit-{tool.replace('_', '-')}"
    if not path.is_file():
        pytest.fail(f"{path} is not installed: run `pip install -e .` in {REPO_ROOT}")
    return str(path)


def run_tool(tool, argv, tmp, cwd=REPO_ROOT, timeout=180):
    """`tfsplit-<tool> argv` (with {tmp} in argv replaced) in a subprocess."""
    return subprocess.run(
        [console_script(tool), *(arg.format(tmp=tmp) for arg in argv)],
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr):
    """What stderr holds besides absl's log lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if not ABSL_LOG_LINE.match(line)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    runs = {**{case: (tool, argv) for case, (tool, argv, _) in CASES.items()}, "verbose": VERBOSE}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(run_tool, *run, tmp) for case, run in runs.items()}
        futures["plan"] = pool.submit(run_tool, *PLAN, tmp, cwd=tmp)
    return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_and_status_2(results, case):
    tool, _, expected = CASES[case]
    result = results[case]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"tfsplit-{tool.replace('_', '-')}: error: ")
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_tensorflow_start_up_is_quiet_unless_verbose(results):
    for case in CASES:
        assert not TF_NOISE.search(results[case].stderr), (case, results[case].stderr)
    verbose = results["verbose"]
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr  # -v 1 adds the traceback
    assert verbose.stderr.splitlines()[-1] == results["evaluate"].stderr.strip()


def test_a_benchmark_tool_runs_from_outside_the_clone(results):
    plan = results["plan"]
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "link time of all" in plan.stdout


# --- a training server that refuses the token, or none at all -----------------------------------


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _timed_train(server, tmp, *flags):
    start = time.monotonic()
    argv = [f"--config={SMOKE}", f"--workdir={tmp}/device", f"--server={server}", *flags]
    result = run_tool("train", argv, tmp)
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """tfsplit-train against a server with another token, and against a closed port."""
    tmp = tmp_path_factory.mktemp("refused")
    (tmp / "token").write_text("the-servers-token\n")
    (tmp / "wrong").write_text("another-token\n")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfsplit_tools.train_server",
            f"--config={SMOKE}",
            f"--token_file={tmp / 'token'}",
            "--port=0",
            f"--workdir={tmp / 'server'}",
        ],
        cwd=REPO_ROOT,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            unreachable = pool.submit(
                _timed_train,
                f"127.0.0.1:{_closed_port()}",
                tmp / "unreachable",
                f"--retry_for_s={RETRY_FOR_S}",
            )
            line = server.stdout.readline()
            match = re.match(r"listening on (127\.0\.0\.1:\d+)", line)
            assert match, line
            wrong_token = pool.submit(
                _timed_train, match.group(1), tmp / "wrong_token", f"--token_file={tmp / 'wrong'}"
            )
            return {"wrong_token": wrong_token.result(), "unreachable": unreachable.result()}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_refused_token_is_one_line_and_status_2(refused):
    result, _ = refused["wrong_token"]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("tfsplit-train: error: the server refused the token")
    assert "UNAUTHENTICATED" in line and "--token_file" in line


def test_an_unreachable_server_is_one_line_and_status_2_in_bounded_time(refused):
    result, seconds = refused["unreachable"]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("tfsplit-train: error: cannot reach the server")
    assert "UNAVAILABLE" in line
    assert seconds < UNREACHABLE_BOUND_S  # --retry_for_s holds; the default retries for 120 s


# --- imports without side effects; the benchmark tools need a clone ------------------------------


def _module_level_statements(path):
    tree = ast.parse(path.read_text())
    body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body  # the docstring
    return body


@pytest.mark.parametrize(
    "path", sorted(p.name for p in (REPO_ROOT / "tools").glob("*.py") if p.name != "cli.py")
)
def test_a_tool_module_only_imports_and_defines_at_import_time(path):
    """Imports, constants, flags and functions; the quieting and the run come in `__main__`."""
    for node in _module_level_statements(REPO_ROOT / "tools" / path):
        if isinstance(node, ast.If):  # only `if __name__ == "__main__":`
            assert ast.unparse(node.test) == "__name__ == '__main__'", ast.unparse(node)
            calls = [ast.unparse(statement) for statement in node.body]
            assert calls == ["cli.quiet_tensorflow_startup(sys.argv)", "cli.run(main)"]
            continue
        allowed = (ast.Import, ast.ImportFrom, ast.Assign, ast.FunctionDef, ast.ClassDef)
        if isinstance(node, ast.Expr):  # flags.mark_flags_as_required([...])
            assert ast.unparse(node.value.func).startswith("flags."), ast.unparse(node)
        else:
            assert isinstance(node, allowed), ast.unparse(node)
        if isinstance(node, ast.Assign):  # a constant, or a flag from flags./config_flags.
            value = node.value
            if isinstance(value, ast.Call):
                assert ast.unparse(value.func).split(".")[0] in ("flags", "config_flags")


def test_importing_tools_changes_no_process_state():
    """No import hook, no redirected stderr, no environment variable, no sys.path entry."""
    code = """
import os, sys
import tfsplit, tfsplit.device  # what the library itself sets (TF_USE_LEGACY_KERAS), first
state = lambda: (list(sys.meta_path), os.fstat(2).st_ino, dict(os.environ), list(sys.path))
before = state()
import tfsplit_tools, tfsplit_tools.cli, tfsplit_tools.run_head  # one tool: their flags clash
assert state() == before, "importing the tools changed the process"
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_benchmark_tool_outside_a_clone_says_it_needs_one(tmp_path):
    """The tools as installed (no benchmarks/ beside them): one line and status 2."""
    shutil.copytree(
        REPO_ROOT / "tools",
        tmp_path / "site" / "tfsplit_tools",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    # What the console script's wrapper does (the copy's tools are not installed as scripts).
    entry = "import sys; from tfsplit_tools import cli; sys.argv[0] = 'tfsplit-bench-train'; "
    entry += "cli.main()"
    result = subprocess.run(
        [sys.executable, "-c", entry, f"--config={SMOKE}", f"--workdir={tmp_path / 'bench'}"],
        cwd=tmp_path,
        env={**_environment(), "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert line.startswith("tfsplit-bench-train: error: this tool needs a clone of tfsplit")
    assert "Traceback" not in result.stderr
