"""The package's layering cannot drift back: entry points on top (`stages/<name>.py`), a library below whose imports
point one way (base <- dataset <- model <- the stages; render beside model, for the report only), no import cycles,
a torch- and numpy-free base, and one list of models.

Each rule is a function that returns its violations for a given import graph, so the tests below also show that
every rule fails on a graph that breaks it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from repo_root import REPO_ROOT

PACKAGE = "stages"
# which library layer may import which (a layer may always import itself)
LAYERS = {"base": set(), "dataset": {"base"}, "model": {"base", "dataset"}, "render": {"base"}}
TORCH_FREE = ("torch", "torchvision", "numpy", "PIL", "pandas", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports anywhere in its source (also inside functions: an
    import hidden in a function is how the old common <-> config circle went unseen), third-party ones included."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names
                             if (REPO_ROOT / node.module.replace(".", "/") / f"{alias.name}.py").is_file()}
        graph[module_name(path)] = imported
    return graph


def layer_of(module: str) -> str | None:
    """'base', 'dataset', 'model' or 'render' for a library module; None for an entry point (stages.<name>)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def own(imported: set[str], graph: dict[str, set[str]]) -> set[str]:
    return {name for name in imported if name in graph and name != PACKAGE}


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None:
            continue
        for target in sorted(own(imported, graph)):
            target_layer = layer_of(target)
            if target_layer is None:
                problems.append(f"{module} imports the stage {target}: a library never imports an entry point")
            elif target_layer != layer and target_layer not in LAYERS[layer]:
                problems.append(f"{module} imports {target}: {layer} may import only "
                                f"{', '.join(sorted(LAYERS[layer])) or 'itself'}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among the package's modules (each found once, as a path that returns to its start)."""
    found, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(own(graph[module], graph)):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def heavy_imports_in_base(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} imports {name}" for module, imported in sorted(graph.items()) if layer_of(module) == "base"
            for name in sorted(imported) if name.split(".")[0] in TORCH_FREE]


def test_library_imports_point_one_way() -> None:
    assert layering_violations(import_graph()) == []


def test_there_is_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_base_imports_neither_torch_nor_numpy() -> None:
    assert heavy_imports_in_base(import_graph()) == []


def test_importing_the_base_loads_no_torch() -> None:
    """What the YAML tools and the ONNX deployment side import starts without torch or numpy, for real."""
    code = ("import sys; import stages.base.config, stages.base.paths, stages.base.runtime, stages.base.specs; "
            f"print(sorted(m for m in {TORCH_FREE!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "extra_import", "expected"), [
    ("stages.base.config", "stages.model.nets", "stages.base.config imports stages.model.nets: base may import "
                                                "only itself"),
    ("stages.dataset.images", "stages.model.tensors", "stages.dataset.images imports stages.model.tensors: dataset "
                                                      "may import only base"),
    ("stages.model.nets", "stages.train", "stages.model.nets imports the stage stages.train: a library never "
                                          "imports an entry point"),
])
def test_a_wrong_way_import_is_caught(module: str, extra_import: str, expected: str) -> None:
    graph = import_graph()
    graph[module] = graph[module] | {extra_import}
    assert expected in layering_violations(graph)


def test_a_cycle_and_a_heavy_base_import_are_caught() -> None:
    graph = import_graph()
    graph["stages.base.runtime"] = graph["stages.base.runtime"] | {"stages.base.config", "numpy"}
    assert ["stages.base.config", "stages.base.runtime", "stages.base.config"] in cycles(graph)
    assert heavy_imports_in_base(graph) == ["stages.base.runtime imports numpy"]


def test_the_model_lists_agree() -> None:
    """The torch-free list of models (params schema, size checks) names exactly the models nets.py builds."""
    from stages.base.specs import CONV_NETS, LAYER_KEYS, MODELS, RESOLUTION_FREE
    from stages.model.nets import BUILDERS

    assert set(MODELS) == set(BUILDERS)
    assert set(RESOLUTION_FREE) <= set(CONV_NETS) <= set(MODELS)
    assert set(LAYER_KEYS) <= set(MODELS)
