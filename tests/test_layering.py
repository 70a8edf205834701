"""The package's import graph: every import, function-level ones included, goes down the
layers below, and there is no cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "densenet_fast"

# Bottom to top. A module may import modules of its own layer or of lower ones; the cycle
# check keeps imports within one layer honest.
LAYERS = [
    ["ops.capability", "ops.formats", "ops.triton_kernels", "ops.triton_tuning",
     "ops.measure", "ops.lowp_conv", "ops.library", "state_dict", "validation",
     "architecture", "timm_parts", "disk_cache", "machine", "cpu_engine_cache"],
    ["ops.schema", "ops.batchnorm", "ops.conv_layout"],
    ["ops.torch_impl"],
    ["ops"],
    ["ops.triton_impl"],
    ["backends"],
    ["sync"],
    ["spec"],
    ["block"],
    ["stem", "fusion"],
    ["differentiable"],
    ["graph"],
    ["plan"],
    ["model", "reference"],
    ["convert"],
    ["timm"],
    ["benchmark", "benchmark.steps", "benchmark.timing", "benchmark.progress",
     "benchmark.implementations", "benchmark.runner", "benchmark.memory", "benchmark.report",
     "benchmark.sweeps", "benchmark.roofline", "training", "training.data",
     "training.checkpoint", "training.recipe", "training.loop"],
    ["cli", "timm_train"],
    [""],  # the package's __init__
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules) -> set[str]:
    """The package modules ``name`` imports (names relative to the package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "densenet_fast":
                base = []
            else:
                continue
            module = ".".join(base + (node.module.split(".")[1:] if not node.level and
                                      node.module else [node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{module}.{alias.name}".lstrip(".")
                found.add(submodule if submodule in modules else module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "densenet_fast":
                    found.add(".".join(alias.name.split(".")[1:]))
    found.discard(name)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert set(_graph()) == set(LEVEL), "add new modules to LAYERS"


def test_imports_go_down_the_layers():
    upward = [f"{name} imports {dep}" for name, deps in _graph().items() for dep in deps
              if LEVEL[dep] > LEVEL[name]]
    assert not upward, upward


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_checks_see_an_upward_import(tmp_path, monkeypatch):
    # The parser must resolve the forms the package uses; an upward import must be found.
    modules = {"ops": PACKAGE / "ops" / "__init__.py", "backends": PACKAGE / "backends.py",
               "ops.schema": tmp_path / "schema.py"}
    (tmp_path / "schema.py").write_text(
        "from .. import backends\nfrom ..backends import activate\n"
        "def f():\n    import densenet_fast.backends\n")
    assert _imports("ops.schema", modules["ops.schema"], modules) == {"backends"}
