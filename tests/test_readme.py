"""The README is a user guide that works: its snippet runs as printed, its commands parse their
flags, its links and the guides' links resolve, and it stays short with the detail in docs/."""

import configparser
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
GUIDES = ("networked-training.md", "data.md", "deployment.md", "method.md", "configs.md")
PAGES = GUIDES + ("results.md", "experiments.md")
SETUP_COMMANDS = [
    "python3 -m pip install -e . && tfsplit-train --config=configs/deprune.py "
    "--workdir=/tmp/tfsplit/deprune",
    "python3 -m pip install -e '.[test]' && python3 -m pytest -q",
]
# One example a job: train, over the network, data from a bucket, export and serve, reproduce.
JOB_SCRIPTS = (
    "tfsplit-train",
    "tfsplit-train-server",
    "tfsplit-prepare-data",
    "tfsplit-export",
    "tfsplit-serve",
    "tfsplit-run-head",
    "tfsplit-infer",
    "tfsplit-reproduce",
)
SHELL_LANGUAGES = ("sh", "bash", "shell", "")
_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", flags=re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# A line that runs a console script: at its start or after `&&`, past any VAR=value prefixes.
_COMMAND_LINE = re.compile(r"(?:^|&&)\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*tfsplit-[a-z-]+(?:\s|$)")

# Runs in a subprocess (cwd: the repository root, so configs/*.py resolve): imports each tool's
# module once and parses each of its commands with absl, as the console script would, without
# running main. Tools define flags of the same names, so each tool's flags are removed before the
# next one is imported; ml_collections defines `--config.x` override flags while parsing, and reads
# them from sys.argv.
_PARSE_PROGRAM = r"""
import importlib, json, sys
from absl import flags

FLAGS = flags.FLAGS
jobs = json.load(sys.stdin)
errors = [None] * len(jobs)
by_module = {}
for index, (module, argv) in enumerate(jobs):
    by_module.setdefault(module, []).append((index, argv))


def touch_configs():
    for name in list(FLAGS):
        flag = FLAGS[name]
        if type(flag).__module__.startswith("ml_collections"):
            value = flag.value  # a config file that failed to load raises on first use
            if hasattr(value, "to_dict"):
                value.to_dict()


for module, commands in by_module.items():
    before = set(FLAGS)
    try:
        importlib.import_module(module)
    except Exception as e:
        for index, _ in commands:
            errors[index] = f"import {module}: {type(e).__name__}: {e}"
        continue
    tool_flags = set(FLAGS)
    for index, argv in commands:
        sys.argv = list(argv)
        try:
            rest = FLAGS(argv)
            if len(rest) > 1:
                raise ValueError(f"unexpected arguments {rest[1:]}")
            touch_configs()
        except Exception as e:
            errors[index] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            FLAGS.unparse_flags()
            for name in set(FLAGS) - tool_flags:
                delattr(FLAGS, name)
    for name in set(FLAGS) - before:
        delattr(FLAGS, name)
print("PARSED " + json.dumps(errors))
"""


def python_snippet():
    section = README.read_text().split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def code_blocks(path, languages=None):
    """(language, text) of each fenced block in a markdown file, in order."""
    blocks = _FENCE.findall(path.read_text())
    return [(lang, text) for lang, text in blocks if languages is None or lang in languages]


def prose(path):
    """The file's text without its fenced code blocks (links in code are not links)."""
    return _FENCE.sub("", path.read_text())


def shell_commands(path):
    """Each `tfsplit-*` command in the file's shell blocks, as argv (continuations joined)."""
    commands = []
    for _, text in code_blocks(path, SHELL_LANGUAGES):
        for line in text.replace("\\\n", " ").splitlines():
            if not _COMMAND_LINE.search(line):  # prose or a diagram in an untagged block
                continue
            words = shlex.split(line, comments=True)
            while words:
                segment = words[: words.index("&&")] if "&&" in words else words
                words = words[len(segment) + 1 :]
                while segment and _ENV_ASSIGNMENT.match(segment[0]):
                    segment = segment[1:]
                if segment and segment[0].startswith("tfsplit-"):
                    commands.append(segment)
    return commands


def tool_module(script):
    """The module a console script runs: tfsplit-train-server -> tfsplit_tools.train_server."""
    return "tfsplit_tools." + script[len("tfsplit-") :].replace("-", "_")


def console_scripts():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    entries = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    return {entry.split("=")[0].strip() for entry in entries if entry.strip()}


def markdown_pages():
    return [README] + sorted(DOCS.glob("*.md"))


def all_commands():
    return [
        (f"{path.relative_to(ROOT)}:{index}", argv)
        for path in markdown_pages()
        for index, argv in enumerate(shell_commands(path))
    ]


def heading_anchors(path):
    """GitHub's anchors for the headings of a markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+ (.*)$", prose(path), flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_snippet_is_at_most_15_lines():
    assert len(python_snippet().strip().splitlines()) <= 15


def test_snippet_cuts_trains_evaluates_and_exports(tmp_path):
    code = python_snippet()
    assert "tfsplit.split_model(" in code and ".fit(" in code and "export_head(" in code
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line for line in result.stdout.splitlines() if "'payload_bytes_up'" in line]
    assert [line.split()[0] for line in printed] == ["16", "8"]
    assert all("'accuracy'" in line for line in printed)
    assert (tmp_path / "my_head" / "head_int8.tflite").is_file()


def test_readme_is_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_readme_starts_with_the_two_setup_commands():
    first_two = [text.strip() for _, text in code_blocks(README)[:2]]
    assert first_two == SETUP_COMMANDS


def test_readme_has_an_example_for_each_job():
    scripts = {argv[0] for argv in shell_commands(README)}
    assert not set(JOB_SCRIPTS) - scripts


def test_readme_has_a_results_section_that_links_to_the_results_page():
    section = README.read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/results.md)" in section


def test_every_figure_in_the_readmes_results_is_on_the_results_page():
    """The README quotes docs/results.md, whose method tables are generated from results/."""
    section = README.read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    page = (DOCS / "results.md").read_text()
    figures = re.findall(r"\d+\.\d+", section)
    assert figures
    assert [f for f in figures if f not in page] == []


def test_docs_hold_the_guides_results_and_experiments():
    for name in PAGES:
        page = DOCS / name
        assert page.is_file(), f"docs/{name} is missing"
        assert page.read_text().startswith("# "), f"docs/{name} must open with its title"
        assert f"(docs/{name})" in README.read_text(), f"README.md does not link to docs/{name}"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page):
    broken = []
    for target in _LINK.findall(prose(page)):
        if re.match(r"^[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_every_command_runs_a_console_script_whose_module_exists():
    scripts = console_scripts()
    commands = all_commands()
    assert len(commands) >= 15
    for where, argv in commands:
        assert argv[0] in scripts, f"{where}: {argv[0]} is not a console script in setup.cfg"
        assert importlib.util.find_spec(tool_module(argv[0])), f"{where}: no {tool_module(argv[0])}"


# Commands that must not parse, so that the parse check is not vacuous: a wrong flag, a wrong
# config key, a missing config file, a missing required flag.
BAD_COMMANDS = [
    ["tfsplit-train", "--config=configs/deprune.py", "--workdir=/tmp/x", "--no_such_flag=1"],
    ["tfsplit-train", "--config=configs/deprune.py", "--config.no_such_key=1", "--workdir=/tmp/x"],
    ["tfsplit-train", "--config=configs/no_such_file.py", "--workdir=/tmp/x"],
    ["tfsplit-train", "--config=configs/deprune.py"],
]


def flag_errors(commands):
    """Each argv's flag-parsing error by its console script's module (None: it parses), parsed in
    one subprocess."""
    jobs = [(tool_module(argv[0]), argv) for argv in commands]
    result = subprocess.run(
        [sys.executable, "-c", _PARSE_PROGRAM],
        input=json.dumps(jobs),
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PARSED ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("PARSED ") :])


@pytest.fixture(scope="module")
def parse_errors():
    """{where: the command's flag-parsing error, None when it parses}, BAD_COMMANDS included."""
    commands = all_commands() + [(f"bad:{i}", argv) for i, argv in enumerate(BAD_COMMANDS)]
    errors = flag_errors([argv for _, argv in commands])
    return {where: error for (where, _), error in zip(commands, errors)}


@pytest.mark.parametrize("where", [where for where, _ in all_commands()])
def test_every_command_parses_its_flags(where, parse_errors):
    argv = dict(all_commands())[where]
    assert parse_errors[where] is None, f"{where}: {shlex.join(argv)}\n{parse_errors[where]}"


def test_a_bad_command_fails_to_parse(parse_errors):
    for index, argv in enumerate(BAD_COMMANDS):
        assert parse_errors[f"bad:{index}"], f"parsed without error: {shlex.join(argv)}"
