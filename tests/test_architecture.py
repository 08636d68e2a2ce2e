"""The import rules of docs/architecture.md, read from the source with `ast`.

A room imports only rooms in lower tiers (or itself); the device side imports no TensorFlow; no
module imports itself back through others; imports sit at the top of a module, except those of
optional dependencies, each with a comment saying which; nothing installed imports `benchmarks`
or the tools.
"""

import ast
import collections
import pathlib
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# package name -> folder; tools/ is installed as `tfsplit_tools`.
PACKAGES = {
    "tfsplit": REPO / "tfsplit",
    "tfsplit_tools": REPO / "tools",
    "benchmarks": REPO / "benchmarks",
}

# The rooms of tfsplit/, bottom-up: a room may import rooms of a lower tier, never its own tier's
# neighbours or a higher tier. The package's own __init__ (the lazy public API) stands above all.
TIERS = (
    ("codec", "auth", "records", "schedule", "protocol"),
    ("device", "layers", "data"),
    ("engine", "serving"),
    ("callbacks", "backbones"),
    ("training",),
    ("export",),
    ("eval",),
)
TIER = {room: number for number, rooms in enumerate(TIERS) for room in rooms}
# Rooms a device runs without TensorFlow (codec.wire is the codec's TensorFlow side).
TENSORFLOW_FREE = (
    "tfsplit.device",
    "tfsplit.auth",
    "tfsplit.codec",
    "tfsplit.records",
    "tfsplit.schedule",
    "tfsplit.protocol",
)
TENSORFLOW_FREE_EXCEPT = ("tfsplit.codec.wire",)
TENSORFLOW_PACKAGES = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "tensorboard")


def _module_name(package, folder, path):
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _modules():
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            modules[_module_name(package, folder, path)] = path
    return modules


MODULES = _modules()


def _is_package(name):
    return MODULES[name].name == "__init__.py"


def _targets(node, module):
    """The modules an import statement loads: `from pkg import sub` loads pkg.sub, not pkg."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if not _is_package(module):
            parts.pop()
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    submodules = [
        f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES
    ]
    return submodules if len(submodules) == len(node.names) else [base, *submodules]


def _own(name):
    """The project module `name` resolves to (a name inside a module resolves to the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _function_imports(tree):
    inside = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(
                id(node)
                for node in ast.walk(function)
                if isinstance(node, (ast.Import, ast.ImportFrom))
            )
    return inside


def _imports():
    """module -> [(line, imported name, inside a function)], every import in the source."""
    found = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        inside = _function_imports(tree)
        found[module] = [
            (node.lineno, target, id(node) in inside)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in _targets(node, module)
        ]
    return found


IMPORTS = _imports()


def _graph():
    graph = collections.defaultdict(set)
    for module, imports in IMPORTS.items():
        for _, target, in_function in imports:
            own = _own(target)
            if own and own != module and not in_function:
                graph[module].add(own)
    return graph


def _room(module):
    parts = module.split(".")
    return parts[1] if parts[0] == "tfsplit" and len(parts) > 1 else None


def test_every_room_has_a_tier_and_a_docstring():
    rooms = {_room(module) for module in MODULES if _room(module)}
    assert rooms == set(TIER), "a room of tfsplit/ is missing from TIERS, or TIERS names a gone one"
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            assert ast.get_docstring(
                ast.parse(path.read_text())
            ), f"{path} says nothing of its room"


def test_at_most_five_loose_modules():
    loose = [path.name for path in (REPO / "tfsplit").glob("*.py") if path.name != "__init__.py"]
    assert len(loose) <= 5, loose


def test_rooms_import_only_lower_tiers():
    wrong = []
    for module, targets in _graph().items():
        room = _room(module)
        for target in targets:
            if room and _room(target) and _room(target) != room:
                if TIER[_room(target)] >= TIER[room]:
                    wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the tiers of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    state = {}
    cycles = []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def _optional_comment(path, line):
    lines = path.read_text().splitlines()
    return any("optional" in lines[number - 1].lower() for number in (line - 1, line) if number)


def test_imports_inside_functions_are_optional_dependencies_only():
    hidden = [
        f"{MODULES[module]}:{line} imports {target}"
        for module, imports in IMPORTS.items()
        for line, target, in_function in imports
        if in_function and not _optional_comment(MODULES[module], line)
    ]
    assert not hidden, "imports inside functions without an '# optional: ...' comment:\n" + (
        "\n".join(hidden)
    )


def test_the_installed_library_imports_neither_benchmarks_nor_tools():
    wrong = [
        f"{module} -> {target}"
        for module, imports in IMPORTS.items()
        if module.startswith("tfsplit.") or module == "tfsplit"
        for _, target, _ in imports
        if target.split(".")[0] in ("benchmarks", "tfsplit_tools", "tools")
    ]
    assert not wrong, wrong


def _closure(module):
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo.extend(".".join(parts[:n]) for n in range(1, len(parts)))  # parents load first
        todo.extend(_graph().get(current, ()))
    return seen


@pytest.mark.parametrize("room", TENSORFLOW_FREE)
def test_device_side_rooms_import_no_tensorflow(room):
    for module in (name for name in MODULES if name == room or name.startswith(room + ".")):
        if module in TENSORFLOW_FREE_EXCEPT:
            continue
        for loaded in _closure(module):
            tensorflow = [
                target
                for _, target, in_function in IMPORTS[loaded]
                if not in_function and target.split(".")[0] in TENSORFLOW_PACKAGES
            ]
            assert not tensorflow, f"{module} loads {loaded}, which imports {tensorflow}"


def test_device_side_rooms_load_without_tensorflow():
    names = ", ".join(room for room in TENSORFLOW_FREE)
    code = (
        f"import sys, {names}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{TENSORFLOW_PACKAGES!r})\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_device_distribution_holds_only_tensorflow_free_rooms():
    """packaging/device installs the rooms that load no TensorFlow, and the device programs."""
    with open(REPO / "packaging" / "device" / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    packages = project["tool"]["setuptools"]["packages"]
    rooms = {p for p in packages if p.count(".") == 1 and p.startswith("tfsplit.")}
    assert rooms == set(TENSORFLOW_FREE)
    assert set(packages) - rooms == {"tfsplit", "tfsplit.device.training", "tfsplit_tools"}
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"tfsplit-device-train", "tfsplit-run-head"}
    for tool in ("device_train", "run_head", "cli"):  # what the device's scripts load
        for loaded in _closure(f"tfsplit_tools.{tool}"):
            assert not [
                target
                for _, target, in_function in IMPORTS[loaded]
                if not in_function and target.split(".")[0] in TENSORFLOW_PACKAGES
            ], loaded
