"""The house rules (docs/design.md), checked on the source: no import cycle, the never-rules, file sizes.

Every ``import`` counts, also the ones inside functions (a lazy import still ties two modules together), and
``from rsd.policy import RSDPolicy`` counts as importing the submodule ``rsd.policy`` loads that name from.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "rsd"
MAX_LINES = 400

# The model pipeline: never imports the simulator, the evaluation or the command line.
CORE = ("rsd.errors", "rsd.config", "rsd.stats", "rsd.limits", "rsd.fingerprint", "rsd.checkpoint", "rsd.filelock",
        "rsd.observation", "rsd.images", "rsd.layout", "rsd.normalize", "rsd.action_space", "rsd.tokenizer",
        "rsd.heads", "rsd.speculative", "rsd.fastpath", "rsd.backbones", "rsd.suites", "rsd.prompt",
        "rsd.policy.protocol", "rsd.policy.identity",
        "rsd.policy.postprocess", "rsd.policy.learned", "rsd.policy.oft", "rsd.policy.roundtrip",
        "rsd.policy.decode", "rsd.policy.greedy_check", "rsd.policy.packaged", "rsd.policy.batching", "rsd.corruption")
OUTSIDE_CORE = ("rsd.sim", "rsd.eval", "rsd.cli", "rsd.collect", "rsd.train", "rsd.bench", "rsd.gpu_bench", "rsd.info",
                "rsd.sensitivity", "rsd.sensitivity_replay")
# The simulator: never reaches model internals; it knows policies only through their protocol.
SIM = ("rsd.sim",)
MODEL_INTERNALS = ("rsd.backbones", "rsd.heads", "rsd.tokenizer", "rsd.speculative", "rsd.fastpath",
                   "rsd.layout", "rsd.action_space", "rsd.policy.learned", "rsd.policy.oft", "rsd.policy.roundtrip",
                   "rsd.policy.factory", "rsd.eval", "rsd.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _lazy_exports(path: Path) -> dict[str, str]:
    """A package's names loaded on first use (``rsd/policy/__init__.py``'s ``_EXPORTS = {name: submodule}``), so
    that ``from rsd.policy import RSDPolicy`` counts as importing ``rsd.policy.learned``."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def _imports(path: Path, name: str, known: set[str], lazy: dict[str, dict[str, str]] | None = None) -> set[str]:
    """rsd modules ``path`` imports anywhere in its body. ``from rsd.x import y`` counts as rsd.x.y when that is
    a module, as the submodule package rsd.x loads ``y`` from on first use (``lazy``, :func:`_lazy_exports`),
    else as rsd.x."""
    lazy = lazy or {}
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known
                       else f"{base}.{lazy[base][a.name]}" if a.name in lazy.get(base, {}) else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("rsd") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    lazy = {name: _lazy_exports(path) for name, path in modules.items() if path.name == "__init__.py"}
    return {name: _imports(path, name, known, lazy) for name, path in modules.items()}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_core_never_imports_sim_eval_or_cli() -> None:
    graph = _graph()
    bad = {m: sorted(t for t in deps if _under(t, OUTSIDE_CORE)) for m, deps in graph.items() if _under(m, CORE)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_sim_never_imports_model_internals() -> None:
    graph = _graph()
    bad = {m: sorted(t for t in deps if _under(t, MODEL_INTERNALS)) for m, deps in graph.items() if _under(m, SIM)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_module_over_400_lines() -> None:
    sizes = {str(p.relative_to(PKG.parent)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


def test_the_rules_can_fail(tmp_path: Path) -> None:
    """The checks see lazy imports, names a package loads lazily, and cycles: synthetic modules and a synthetic
    graph with each are caught."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = _modules()
    known = set(modules)
    lazy = {name: _lazy_exports(path) for name, path in modules.items() if path.name == "__init__.py"}
    assert lazy["rsd.policy"]["RSDPolicy"] == "learned"  # rsd.policy's lazy loader is read
    sim_module = tmp_path / "fake_sim.py"
    sim_module.write_text("def f():\n    from rsd.policy import RSDPolicy\n    from rsd.heads import RFSQHead\n")
    deps = _imports(sim_module, "rsd.sim.fake_sim", known, lazy)
    assert deps == {"rsd.policy.learned", "rsd.heads"}
    assert all(_under(d, MODEL_INTERNALS) for d in deps)
    core_module = tmp_path / "fake_core.py"
    core_module.write_text("def g():\n    import rsd.eval.cli\n    from rsd.sim import libero\n")
    assert {d for d in _imports(core_module, "rsd.heads", known, lazy) if _under(d, OUTSIDE_CORE)} == {
        "rsd.eval.cli", "rsd.sim.libero"}
    src = PKG / "policy" / "protocol.py"
    assert "numpy" in src.read_text() and "import torch" not in src.read_text()
