"""The shape of the code: fabula's packages import each other as a DAG (cli -> operations,
deploy, db, autoscaling -> environment -> roles -> providers' interfaces -> config, state,
errors), and only the provider registry names a provider's own package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "fabula"
REGISTRY = "fabula.environment.opening"


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "fabula" or n.startswith("fabula.")}


def unit(module: str) -> str:
    """The package a module belongs to, for the graph: each provider's package (and the shared
    HAProxy load balancer) stays apart from fabula.providers (the interfaces)."""
    parts = module.split(".")
    if parts[1:2] == ["providers"] and len(parts) > 2 and parts[2] != "base":
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        for target in imports(path):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]  # `from fabula.x import name`: the module x
            if target in known and unit(target) != unit(name):
                edges.setdefault(unit(name), set()).add(unit(target))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_packages_import_each_other_without_a_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


# the aws provider reaches its instances over the ssh provider's transport and prepares them with
# its code: those modules, and only those, are shared
SHARED = {"fabula.providers.ssh": ("fabula.providers.aws", ("fabula.providers.ssh.transport",
                                                            "fabula.providers.ssh.preparation",
                                                            "fabula.providers.ssh.scripts"))}


@pytest.mark.parametrize("provider", ["local", "ssh", "aws"])
def test_only_the_registry_imports_a_provider(provider: str):
    known, package = modules(), f"fabula.providers.{provider}"
    sharer, shared = SHARED.get(package, ("", ()))
    importers = sorted(name for name, path in known.items()
                       if unit(name) != package and any(t.startswith(package) and not (
                           unit(name) == sharer and t.startswith(shared)) for t in imports(path)))
    assert importers == [REGISTRY]


@pytest.mark.parametrize("low, high", [("fabula.roles", "fabula.environment"), ("fabula.providers", "fabula.roles"),
                                       ("fabula.environment", "fabula.deploy"), ("fabula.deploy", "fabula.cli"),
                                       ("fabula.deploy", "fabula.autoscaling"), ("fabula.autoscaling", "fabula.cli"),
                                       ("fabula.autoscaling", "fabula.operations"), ("fabula.roles", "fabula.cli")])
def test_lower_layers_do_not_import_higher_ones(low, high):
    edges = graph()
    assert high not in edges.get(low, set())
