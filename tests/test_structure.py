"""The package's shape (docs/ARCHITECTURE.md): no import cycles between modules, no module over 500
lines, every package importing only from its own layer or the layers below it, and `model/` independent
of the layers above it."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "minimoe"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every minimoe module `path` imports, at any depth of the file (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # `from minimoe.model import moe` names module minimoe.model.moe; `from x import f` names x
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # a package's __init__ re-exporting its submodules is not a dependency of those submodules
    return {n: {d for d in imports_of(p, n, known) if not n.startswith(d + ".")} for n, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if d.startswith(n + "."):  # a package importing its own submodule
                continue
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    g = {n: {d for d in deps if not (n.startswith(d + ".") or d == "minimoe")} for n, deps in graph().items()}
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("layer", ["train", "infer", "hf", "dist", "serve", "lab", "cli", "eval", "finetune"])
def test_model_does_not_import_upper_layers(layer):
    g = graph()
    bad = {n: d for n, deps in g.items() if n.startswith("minimoe.model") for d in deps}
    assert not [n for n, d in bad.items() if d.startswith(f"minimoe.{layer}")]


def test_no_module_over_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


# The layers of docs/ARCHITECTURE.md, lowest first: a package imports only from its own layer's
# lower rows or from layers below it.
LAYERS = [
    {"errors", "files", "memory", "provenance"},
    {"config", "presets", "config_yaml"},
    {"data", "model"},
    {"params", "dist", "infer"},
    {"train"},
    {"eval", "hf", "lab", "serve"},
    {"finetune", "bench"},
    {"cli", "__main__"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of docs/ARCHITECTURE.md")


def test_packages_import_only_downwards():
    upward = sorted(
        f"{n} -> {d}" for n, deps in graph().items() if n != "minimoe" for d in deps
        if d != "minimoe" and layer_of(d) > layer_of(n)
    )  # fmt: skip
    assert upward == []
