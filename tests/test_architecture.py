"""The package's layout rules (``shared/docs/architecture.md``), read from the source with ``ast``:

* imports point down the floors: config/config_io, kernels/, parallel/ < nn/ < infer/, analysis/, hf/ <
  train/ < post_train/, eval/ < cli (and no import cycles, even within a floor);
* no ``deepseek_jax`` import inside a function (a lazy internal import means the function is on the wrong floor);
* no module over 450 lines and no function over 80 (exceptions listed below, with the reason);
* variable-tree path strings appear only in ``nn/tree.py`` and ``hf/mapping.py``;
* importing a leaf module does not import training.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "deepseek_jax"

# floor of each top-level part of the package (a module or a subpackage)
FLOORS = {
    "__init__": 0, "config": 1, "config_io": 1, "kernels": 1, "parallel": 1,
    "nn": 2, "sharding": 2,  # sharding.py: the API face of parallel/ and nn/placement.py
    "infer": 3, "analysis": 3, "hf": 3,
    "train": 4,
    "post_train": 5, "eval": 5,
    "cli": 6,
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS: dict[str, str] = {}  # "module:function" -> why it may be longer
LONG_MODULES: dict[str, str] = {}
# module and collection names of the variable tree ("params" and the sown "balance" are left out: they are
# also ordinary report and metric keys)
TREE_STRINGS = ("moe_layers", "dense_layers", "e_score_correction_bias", "router", "ffn", "shared", "layer",
                "fp8_scale", "intermediates", "cache")
NOT_TREE = ("mtp_concat", "mtp_lambda")  # a logical axis name and a hyperparameter
TREE_OWNERS = ("nn/tree.py", "hf/mapping.py")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts): p for p in sorted(PKG.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """``(imported module, node, inside a function)`` for every ``deepseek_jax`` import."""
    tree = ast.parse(path.read_text())
    mods = _modules()
    out: list[tuple[str, ast.AST, bool]] = []

    def visit(node, in_fn):
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child, fn) for a in child.names if a.name.startswith("deepseek_jax"))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("deepseek_jax"):
                for a in child.names:  # "from deepseek_jax.nn import tree" imports the module nn.tree
                    full = f"{child.module}.{a.name}"
                    out.append((full if full in mods else child.module, child, fn))
            visit(child, fn)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i, _, _ in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_every_part_has_a_floor():
    assert {_part(m) for m in _modules()} <= set(FLOORS), set(_part(m) for m in _modules()) - set(FLOORS)


def test_imports_point_down_the_floors():
    bad = []
    for m, deps in _graph().items():
        if _part(m) == "__init__":
            continue  # the lazy package face
        for d in deps:
            if FLOORS[_part(d)] > FLOORS[_part(m)]:
                bad.append(f"{m} (floor {FLOORS[_part(m)]}) imports {d} (floor {FLOORS[_part(d)]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def dfs(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                dfs(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_internal_imports_inside_functions():
    bad = [f"{m}:{node.lineno} imports {i}" for m, p in _modules().items() for i, node, fn in _imports(p) if fn]
    assert not bad, "\n".join(bad)


def test_module_and_function_sizes():
    bad = []
    for m, p in _modules().items():
        text = p.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES and m not in LONG_MODULES:
            bad.append(f"{m}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{m}:{node.name}" not in LONG_FUNCTIONS:
                    bad.append(f"{m}:{node.name}: {length} lines")
    assert not bad, "\n".join(bad)


def test_tree_paths_are_named_in_one_place():
    """String constants equal to a variable-tree name appear only in nn/tree.py and hf/mapping.py."""
    bad = []
    for m, p in _modules().items():
        rel = p.relative_to(PKG).as_posix()
        if rel in TREE_OWNERS:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                v = node.value
                if v in TREE_STRINGS or v.startswith("mtp_") and v not in NOT_TREE:
                    bad.append(f"{rel}:{node.lineno} {v!r}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("leaf", ["deepseek_jax.kernels.fp8", "deepseek_jax.nn.transformer", "deepseek_jax.hf",
                                  "deepseek_jax.infer"])
def test_importing_a_leaf_does_not_import_training(leaf):
    code = (f"import sys, {leaf}; bad = [m for m in sys.modules if m.startswith('deepseek_jax.train')"
            " or m in ('optax', 'orbax.checkpoint', 'tokenizers')]; print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
