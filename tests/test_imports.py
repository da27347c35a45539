"""srdit's imports run one way (DESIGN.md, STYLE): ground floor (config and small helpers) ->
data readers -> kernels -> model -> the preparation tool -> sample -> eval -> train. A module
imports only from its own floor or below, lazy imports inside functions included, and no
modules form a circle."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "srdit")

# (floor, module prefixes); a module's floor is that of its longest matching prefix
FLOORS = [
    (0, ("srdit", "srdit.config", "srdit.flow", "srdit.io", "srdit.progress", "srdit.runinfo", "srdit.distributed",
        "srdit.trainstate")),
    (1, ("srdit.data",)),  # the readers: shards, order, loaders, DALI, crop, sources, digits
    (2, ("srdit.kernels",)),
    (3, ("srdit.model",)),
    (4, ("srdit.data.prepare",)),  # runs the encoders, so it sits above the model
    (5, ("srdit.sample",)),
    (6, ("srdit.eval",)),
    (7, ("srdit.train",)),
]


def floor(module: str) -> int:
    best = max(((len(p), f) for f, prefixes in FLOORS for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} has no floor in tests/test_imports.py"
    return best[1]


def modules() -> dict[str, str]:
    """{dotted name: path} of every module of the srdit package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, name)
    return out


def imports(path: str, known: set[str]) -> set[str]:
    """The srdit modules a file imports (anywhere in it); `from a import b` counts a.b when b is a module."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "srdit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "srdit":
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
            if len(subs) < len(node.names):
                found.add(node.module)
    return found & known


GRAPH = {name: imports(path, set(modules())) - {name} for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_do_not_run_up_a_floor(module):
    up = sorted(dep for dep in GRAPH[module] if floor(dep) > floor(module))
    assert not up, f"{module} (floor {floor(module)}) imports {up} from higher floors"


def test_no_import_circles():
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_detector_sees_a_lazy_upward_import(tmp_path):
    """The premise: an import inside a function body is found."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from srdit.train.loss import diffusion_loss\n")
    assert imports(str(path), {"srdit.train.loss", "srdit.train"}) == {"srdit.train.loss"}
