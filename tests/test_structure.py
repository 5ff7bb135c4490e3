"""The shape of the code: no import cycles, every import goes down the layers of the README's architecture table,
loading a model for sampling never imports training code, modules stay small, and imports inside the package are
relative. Read from the source with `ast`, so a violation names the file and the line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "noisecraft"

# The layers, bottom first (README, "Architecture"): a module may import only from layers below its own, or from
# its own package. Packages of one rank (training and evaluation) are siblings that never import each other.
LAYERS = [
    ("errors",), ("settings", "memory"), ("io",), ("viz",), ("schedule",), ("denoiser",),
    ("likelihood", "likelihood_ode"), ("losses",), ("models",), ("guidance",), ("samplers",), ("config",),
    ("components",), ("convert",), ("data",), ("training", "evaluation"), ("pipelines",), ("ui",), ("commands",),
    ("cli",), ("__main__",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules) -> list[tuple[str, int]]:
    """(imported noisecraft module, line) for every import in the file, lazy ones included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.append((child if child in modules else target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name in modules]
    return [(target, line) for target, line in found if target in modules and target != name]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_layer_table_names_every_package():
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert top == set(RANK), f"add {sorted(top - set(RANK))} to LAYERS (and the README); drop {sorted(set(RANK) - top)}"


def test_no_import_cycles(graph):
    edges = {m: {t for t, _ in deps} for m, deps in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_go_down_the_layers(graph):
    wrong = []
    for module, deps in graph.items():
        here = _layer(module)
        for target, line in deps:
            there = _layer(target)
            if here is None or there is None or here == there:
                continue
            if RANK[there] >= RANK[here]:
                wrong.append(f"{module} line {line} imports {target} ({there} is not below {here})")
    assert not wrong, "\n".join(wrong)


def test_the_cycle_check_catches_a_cycle(tmp_path):
    """The checks above must be able to fail: a two-module cycle is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import x\n")
    b.write_text("from .a import y\n")
    modules = {"noisecraft.a": a, "noisecraft.b": b}
    assert _imports("noisecraft.a", a, modules) == [("noisecraft.b", 1)]
    assert _imports("noisecraft.b", b, modules) == [("noisecraft.a", 1)]


def test_imports_inside_the_package_are_relative():
    absolute = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("noisecraft"))
                or (isinstance(node, ast.Import) and any(a.name.startswith("noisecraft") for a in node.names))]
    assert not absolute, absolute


def test_modules_stay_small():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes["cli.py"] <= 250
    assert not {name: n for name, n in sizes.items() if n > 650}


def test_loading_a_model_for_sampling_imports_no_training_code(tmp_path):
    from test_guidance import write_run

    run = write_run(tmp_path / "run")
    code = ("import sys\n"
            "from noisecraft.pipelines.stable_diffusion import load_pipeline\n"
            f"pipe = load_pipeline({str(run)!r})\n"
            "pipe.sample(1, steps=2)\n"
            "print(sorted(m for m in sys.modules if m.startswith('noisecraft.training')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
