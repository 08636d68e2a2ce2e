"""The console scripts as users run them: a user error is one stderr line and exit status 2.

Every case is a subprocess (`python -m tfsplit_tools.<name>`), as from a shell: the tfsplit_tools' absl flags
would clash in one process. Each fails before any training, so a case costs about one TensorFlow
import; the cases run two at a time.
"""

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO_ROOT / "configs" / "sl.py") + ":smoke"
TF_NOISE = re.compile(r"onednn|cuinit|cuda|absl::InitializeLog|cpu instructions", re.IGNORECASE)

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


def run_tool(tool, argv, tmp):
    # The test process's TF_CPP_MIN_LOG_LEVEL (set by importing tfsplit) would override the tfsplit_tools'.
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "-m", f"tfsplit_tools.{tool}", *(arg.format(tmp=tmp) for arg in argv)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tfsplit_tools")
    runs = {**{case: (tool, argv) for case, (tool, argv, _) in CASES.items()}, "verbose": VERBOSE}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(run_tool, *run, tmp) for case, run in runs.items()}
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
