"""The package's layout holds: import rules per subpackage, module sizes, one default per setting.

The rules are read from the source with ``ast``, so a new import that crosses a layer fails here
before anyone has to notice it in review.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from pipeline import attribute
from pipeline.config import OcclusionConfig
from pipeline.kernel.options import ComputeOptions

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
SUBPACKAGES = (
    "storage",
    "config",
    "data",
    "kernel",
    "incremental",
    "models",
    "run",
    "audit",
    "report",
    "cluster",
    "bench",
    "demo",
)
# subpackage -> the other subpackages (and top-level modules) of ``pipeline`` it may import
ALLOWED: dict[str, set[str]] = {
    "storage": set(),
    "kernel": set(),  # the kernel computes with what it is given; engines are chosen above it
    "incremental": {"kernel"},
    "config": {"kernel", "storage", "schema"},
    "data": {"config", "storage", "schema"},
    "models": {"config", "storage"},
    # ``terminal`` (text from the data made safe to print) serves what prints: inspect, reports
    "run": {"config", "data", "kernel", "incremental", "models", "storage", "schema", "terminal"},
    "audit": {"config", "run", "storage", "schema"},
    # ``exit_codes``: what each command's exit status means, defined once
    "report": {
        "audit",
        "config",
        "data",
        "kernel",
        "run",
        "storage",
        "schema",
        "terminal",
        "exit_codes",
    },
    "cluster": {"config", "storage", "exit_codes"},
    "bench": {"config", "data", "kernel", "incremental", "models", "run", "storage", "schema"},
    "demo": set(SUBPACKAGES) | {"schema"},
}
# third-party packages a subpackage must never import
FORBIDDEN: dict[str, set[str]] = {
    "kernel": {"ray", "pandas", "pyarrow", "matplotlib"},
    "incremental": {"ray", "pandas", "pyarrow", "matplotlib"},
    "storage": {"ray", "torch", "pandas"},
    "config": {"ray", "pandas", "matplotlib"},
    "data": {"ray", "matplotlib"},
    "models": {"ray", "pandas", "matplotlib"},
    "audit": {"ray", "torch", "matplotlib"},
}
MAX_LINES = 350
MAX_TOP_LEVEL_MODULES = 12


def _imports(path: Path) -> list[str]:
    """Absolute module names imported anywhere in ``path`` (function bodies included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use absolute pipeline.* imports"
            names.append(node.module or "")
    return names


def _modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def test_every_subpackage_has_rules_and_a_docstring_naming_its_imports():
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert found == set(SUBPACKAGES) == set(ALLOWED)
    for sub in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"pipeline.{sub} must say what it may import"


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_imports_follow_the_layers(sub):
    bad = []
    for path in _modules(sub):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "pipeline" and len(parts) > 1 and parts[1] != sub:
                if parts[1] not in ALLOWED[sub]:
                    bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
            elif parts[0] in FORBIDDEN.get(sub, ()):
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_kernel_reaches_the_engine_only_when_resolving_one():
    for path in _modules("kernel"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in top:
            module = getattr(node, "module", None) or node.names[0].name
            assert not module.startswith("pipeline.incremental"), path


def test_module_count_and_sizes():
    top = [p for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, [p.name for p in top]
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _api_defaults() -> dict[str, object]:
    params = inspect.signature(attribute).parameters
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    for f in dataclasses.fields(ComputeOptions):
        out[f.name] = f.default
    return out


def _value(v: object) -> object:
    return getattr(v, "value", v)


def test_config_and_api_share_every_occlusion_default():
    api = _api_defaults()
    checked = []
    for f in dataclasses.fields(OcclusionConfig):
        assert f.name in api, f"occlusion.{f.name} has no counterpart in attribute()/ComputeOptions"
        assert _value(f.default) == _value(api[f.name]), (
            f"occlusion.{f.name}: config default {f.default!r} != API default {api[f.name]!r}"
        )
        checked.append(f.name)
    assert {"blur_sigma", "n_baselines", "stride", "engine", "channels_last"} <= set(checked)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_between_modules():
    """Imports anywhere in a module (function bodies too) form no cycle: a module that needs
    another only inside a function still depends on it."""
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # `from pipeline.x import y`: pipeline.x
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                deps.add(imported)
        graph[name] = {d for d in deps if not d.startswith(name + ".") and d != "pipeline"}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
