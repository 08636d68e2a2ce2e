"""What `pip install .` installs: every tfsplit package, the tools as `tfsplit_tools`, no more.

setup.cfg lists the packages by hand (a new sub-package must be added there), maps tools/ to
`tfsplit_tools` so that no top-level `tools` package lands in site-packages, and points every
console script at `tfsplit_tools.cli:main`, which runs the tool its name picks.
"""

import configparser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from tfsplit_tools import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# What a wheel is built from (tests/ and benchmarks/ too: the build must leave them out).
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "tfsplit", "tools", "benchmarks", "tests")


def _setup_cfg():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    return config


def _listed(value):
    return [line.strip() for line in value.strip().splitlines() if line.strip()]


def test_packages_are_every_tfsplit_package_on_disk_and_the_tools():
    options = _setup_cfg()["options"]
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for init in (REPO_ROOT / "tfsplit").rglob("__init__.py")
    }
    assert sorted(_listed(options["packages"])) == sorted(on_disk | {"tfsplit_tools"})
    assert _listed(options["package_dir"]) == ["tfsplit_tools = tools"]


def test_every_tool_has_its_console_script():
    scripts = dict(
        line.split(" = ")
        for line in _listed(_setup_cfg()["options.entry_points"]["console_scripts"])
    )
    assert set(scripts.values()) == {"tfsplit_tools.cli:main"}
    modules = {path.stem for path in (REPO_ROOT / "tools").glob("*.py")} - {"__init__", "cli"}
    assert sorted(cli.TOOLS) == sorted(modules)
    assert sorted(scripts) == sorted("tfsplit-" + tool.replace("_", "-") for tool in cli.TOOLS)


@pytest.mark.parametrize("tool", cli.TOOLS)
def test_a_tools_usage_names_its_console_script(tool):
    source = (REPO_ROOT / "tools" / f"{tool}.py").read_text()
    docstring = source.split('"""')[1]
    assert f"  tfsplit-{tool.replace('_', '-')} " in docstring
    assert "python -m" not in docstring and "def main(argv):" in source


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
    """The file names in a wheel built offline from a copy of the sources (a build in the clone
    would write build/ and an egg-info into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(path, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["--disable-pip-version-check", "-w", str(tmp / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = (tmp / "dist").glob("tfsplit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_holds_tfsplit_and_tfsplit_tools_only(wheel_files):
    top = {name.split("/")[0] for name in wheel_files}
    assert {"tfsplit", "tfsplit_tools"} <= top
    assert not top & {"tools", "benchmarks", "tests", "configs"}
    assert top - {"tfsplit", "tfsplit_tools"} == {"tfsplit-0.1.0.dist-info"}
    tools = {name.split("/", 1)[1] for name in wheel_files if name.startswith("tfsplit_tools/")}
    assert tools == {"__init__.py", "cli.py"} | {f"{tool}.py" for tool in cli.TOOLS}
    assert "tfsplit/training/server/service.py" in wheel_files
