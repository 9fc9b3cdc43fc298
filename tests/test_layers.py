"""The three layers stay apart: the daemon core (gannet) never imports the local harness
(gannet.dev) or the operator tools (gannet.cluster), the modules form no import cycle,
and `gannet run` loads neither the kubernetes client nor matplotlib.

docs/architecture.md describes the layers; these tests are what keeps it true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gannet.settings import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "gannet"
# The command-line entry point spans the layers: it registers the harness's and the
# operator's commands (their argument definitions only; see test_gannet_run_...).
ENTRY_POINT = {"gannet.cli", "gannet.__main__"}
HEAVY = ("kubernetes", "matplotlib")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every gannet module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name == "gannet" or name.startswith("gannet.")}


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    for layer in ("gannet.dev", "gannet.cluster"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "gannet"


def _graph() -> dict[str, set[str]]:
    """module -> the gannet modules it imports (names that are modules, not attributes)."""
    return {name: {i for i in _imports(path) if i in MODULES} for name, path in MODULES.items()}


def test_the_tree_has_the_three_layers():
    layers = {_layer(m) for m in MODULES}
    assert layers == {"gannet", "gannet.dev", "gannet.cluster"}
    assert {"gannet.dispatch", "gannet.daemon", "gannet.dev.bench", "gannet.cluster.ops"} <= set(
        MODULES
    )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "gannet"))
def test_core_modules_import_neither_dev_nor_cluster(module: str):
    if module in ENTRY_POINT:
        pytest.skip("the CLI entry point registers every layer's commands")
    wrong = sorted(i for i in _imports(MODULES[module]) if _layer(i) != "gannet")
    assert not wrong, f"{module} (core) imports {wrong}"


def test_dev_and_cluster_do_not_import_each_other():
    for module, imported in _graph().items():
        layer = _layer(module)
        if layer == "gannet":
            continue
        other = {"gannet.dev": "gannet.cluster", "gannet.cluster": "gannet.dev"}[layer]
        wrong = sorted(i for i in imported if _layer(i) == other)
        assert not wrong, f"{module} imports {wrong}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def _loaded_after(code: str) -> set[str]:
    """Top-level packages and gannet modules in sys.modules after `code`, in a fresh
    interpreter (this test process has imported everything already)."""
    probe = (
        f"{code}\nimport sys\n"
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules} | "
        "{m for m in sys.modules if m.startswith('gannet.')})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return set(done.stdout.split())


def test_importing_the_daemon_loads_no_tool_and_no_harness():
    loaded = _loaded_after("import gannet.daemon")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not {m for m in loaded if _layer(m) != "gannet"}


def test_gannet_run_loads_neither_kubernetes_nor_matplotlib():
    """What the container runs: the CLI parses `run` and calls the daemon's entry point
    (stopped before it connects anywhere)."""
    loaded = _loaded_after(
        "import gannet.cli as cli\n"
        "args = cli.build_parser().parse_args(['run'])\n"
        "assert args.func is cli.cmd_run\n"
        "import gannet.daemon"
    )
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "gannet.cluster.ops" not in loaded and "gannet.dev.demo" not in loaded
