"""The package's rooms: imports go down the floors (no circle but tensor ↔ functional), and every
metric a trainer logs has one documented meaning, listed in the README."""
import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "minirlhf")


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return "minirlhf" + ("" if rel == "__init__" else "." + rel.removesuffix(".__init__"))


def imports_of(path):
    """The minirlhf modules ``path`` imports, at any depth of the file (function-level imports count)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minirlhf")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("minirlhf"):
                continue
            for a in node.names:  # `from . import losses` imports a module, `from .x import f` the module x
                found.add(f"{base}.{a.name}" if os.path.exists(module_path(f"{base}.{a.name}") or "") else base)
    return {m for m in found if m != name}


def module_path(name):
    rel = os.path.join(ROOT, *name.split(".")[1:])
    for candidate in (rel + ".py", os.path.join(rel, "__init__.py")):
        if os.path.exists(candidate):
            return candidate
    return None


def graph():
    edges = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                edges[module_name(path)] = {m for m in imports_of(path) if module_path(m)}
    return edges


def cycles(edges):
    """Every strongly connected set of two or more modules (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_but_tensor_and_functional():
    found = [sorted(c) for c in cycles(graph())]
    assert found == [["minirlhf.functional", "minirlhf.tensor"]], found


@pytest.mark.parametrize("lower, higher", [
    ("minirlhf.checkpoint", "minirlhf.model"), ("minirlhf.sampling", "minirlhf.model"),
    ("minirlhf.losses", "minirlhf.train"), ("minirlhf.tasks", "minirlhf.train"), ("minirlhf.rollout", "minirlhf.train"),
    ("minirlhf.model", "minirlhf.train"), ("minirlhf.train", "minirlhf.cli"),
])
def test_a_lower_room_never_imports_a_higher_one(lower, higher):
    edges = graph()
    offenders = {m: sorted(d for d in deps if d == higher or d.startswith(higher + "."))
                 for m, deps in edges.items() if m == lower or m.startswith(lower + ".")}
    assert not any(offenders.values()), offenders


def test_every_logged_metric_has_one_documented_meaning_in_the_readme():
    from minirlhf.train.metrics import METRICS
    readme = open(os.path.join(ROOT, "..", "README.md")).read()
    table = readme[readme.index("## Metrics"):]
    table = table[:table.index("\n## ", 3)]
    listed = re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(METRICS)


def test_every_function_and_test_the_readme_map_names_exists():
    readme = open(os.path.join(ROOT, "..", "README.md")).read()
    section = readme[readme.index("## A map"):readme.index("## The RLHF pipeline")]
    code = re.findall(r"`(minirlhf/[\w/]+\.py):([\w.]+)`", section)
    tests = re.findall(r"`(tests/\w+\.py)::(\w+)`", section)
    assert len(code) > 20 and len(tests) > 20
    base = os.path.join(ROOT, "..")
    for path, name in code:
        source = open(os.path.join(base, path)).read()
        for part in name.split("."):
            assert re.search(rf"^\s*(def|class) {part}\b|^{part} = ", source, flags=re.M), f"{path}:{name}"
    for path, name in tests:
        assert re.search(rf"^def {name}\(", open(os.path.join(base, path)).read(), flags=re.M), f"{path}::{name}"
