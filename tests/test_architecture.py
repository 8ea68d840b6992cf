"""The package's shape: imports run one way along the pipeline, private names stay in their
folder, modules stay small.

Every ``import`` in every module under ``tpshard/`` counts: module level, inside functions, and
under ``if TYPE_CHECKING:`` (a type-only import is still a dependency). The checker is tested on
a synthetic tree first, so that a passing run means the rules hold, not that the checker is blind.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "tpshard"

# The pipeline's direction, bottom to top. A *unit* is a folder (``tpshard.compiler``) or a
# top-level module (``tpshard.plan``). A module may import from its own unit or from a unit of
# a lower tier; never from a higher tier, nor from another unit of its own tier.
TIERS: list[tuple[str, ...]] = [
    # Helpers with no tpshard imports; the segment arithmetic everything shares.
    ("tpshard._version", "tpshard._doctest", "tpshard.layout"),
    # The contracts: the Plan (what every stage reads or writes), groups and collectives.
    ("tpshard.plan", "tpshard.comm"),
    # Replica subgroups (ranks holding the same replicated shard), on comm.
    ("tpshard.subgroups",),
    # Parallel layers: built on comm and layout alone, usable without the compiler.
    ("tpshard.layers",),
    # Reference models, models without weights, the one MODEL resolver: torch only, so that any
    # stage above may build or resolve a model.
    ("tpshard.models",),
    # capture -> analysis -> planner -> Plan -> rewrite / in place: makes and applies Plans.
    ("tpshard.compiler",),
    # plan() and parallelize(): the compiler's stages composed, the entry point stages above use.
    ("tpshard.api",),
    # Sharded checkpoints: plans through api, writes and reads weights by the Plan.
    ("tpshard.checkpoint",),
    # Equivalence on real ranks: parallelize on each rank, compare with the original.
    ("tpshard.verify",),
    # Users of everything below.
    ("tpshard.testing", "tpshard.cli"),
    # Entry points: `python -m tpshard` and the public names of `import tpshard`.
    ("tpshard.__main__", "tpshard"),
]

MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 12


@dataclass(frozen=True)
class Import:
    source: str        # the importing module
    target: str        # the imported module
    name: str | None   # the name taken from it (``from target import name``), if not a module
    where: str         # file:line


def modules_of(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    """The package-internal imports of one module, each resolved to the module it reaches."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    top = next(iter(modules)).split(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root).as_posix()}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == top:
                    found.append(Import(module, _known(alias.name, modules), None, where))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != top:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # `from tpshard import layout`: the module tpshard.layout
                    found.append(Import(module, sub, None, where))
                else:
                    found.append(Import(module, _known(target, modules), alias.name, where))
    return found


def _known(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``name`` that is a module (``import a.b.c`` where c is a name)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return name


def unit_of(module: str) -> str:
    """``tpshard.compiler.planner`` -> ``tpshard.compiler``; ``tpshard.plan`` -> itself."""
    return ".".join(module.split(".")[:2])


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def check(root: Path, tiers: list[tuple[str, ...]], max_lines: int = MAX_LINES,
          max_top_level: int = MAX_TOP_LEVEL_MODULES) -> list[str]:
    """Every violation of the rules in the package directory ``root``, one line each."""
    modules = modules_of(root)
    tier = {unit: i for i, units in enumerate(tiers) for unit in units}
    problems: list[str] = []
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        n_lines = len(path.read_text().splitlines())
        if n_lines > max_lines:
            problems.append(f"{module} has {n_lines} lines (at most {max_lines}): split it by job")
        src_unit = unit_of(module)
        if src_unit not in tier:
            problems.append(f"{module}: its unit {src_unit} is in no tier; place it in TIERS")
            continue
        for imp in imports_of(module, path, modules, root):
            if imp.target != module:
                graph.add_edge(module, imp.target, where=imp.where)
            dst_unit = unit_of(imp.target)
            what = f"{imp.where} {module} imports {imp.target}" + (f".{imp.name}" if imp.name else "")
            if dst_unit == src_unit:
                continue
            if dst_unit not in tier:
                problems.append(f"{what}: {dst_unit} is in no tier")
            elif tier[dst_unit] >= tier[src_unit]:
                rel = "the same tier" if tier[dst_unit] == tier[src_unit] else "a higher tier"
                problems.append(f"{what}: against the pipeline's direction ({dst_unit} is in {rel} than "
                                f"{src_unit}); move the shared code down, or invert the call")
            private = [p for p in imp.target.split(".")[2:] if _private(p)]
            if imp.name is not None and _private(imp.name) or private:
                problems.append(f"{what}: a private name of {dst_unit} used outside it; make it public there")
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycle = nx.find_cycle(graph.subgraph(component))
            problems.append(f"import cycle among {len(component)} modules: " + " -> ".join(
                f"{a} ({graph.edges[a, b]['where']})" for a, b in cycle) + f" -> {cycle[0][0]}")
    top = sorted(p.name for p in root.glob("*.py"))
    if len(top) > max_top_level:
        problems.append(f"{len(top)} modules at the top level (at most {max_top_level}): {top}")
    return problems


# ---------------------------------------------------------------------------------------------
# The checker, on a synthetic tree.


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


_FAKE_TIERS = [("pkg.low",), ("pkg.stage",), ("pkg.high", "pkg.other"), ("pkg",)]
_CLEAN = {
    "pkg/__init__.py": "from pkg.high import g\n",
    "pkg/low.py": "def f():\n    return 1\n",
    "pkg/stage/__init__.py": "from pkg.stage.mod import visible\n",
    "pkg/stage/_private.py": "def helper():\n    return 2\n",
    "pkg/stage/mod.py": "from pkg import low\nfrom ._private import helper\n\ndef visible():\n    return helper()\n"
                        "\ndef _hidden():\n    return 3\n",
    "pkg/high.py": "from pkg.low import f\nfrom pkg.stage import visible\n\ndef g():\n    return f() + visible()\n",
    "pkg/other.py": "import pkg.stage.mod\n",
}


def test_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    _write(tmp_path, _CLEAN)
    assert check(tmp_path / "pkg", _FAKE_TIERS) == []


def test_checker_names_every_kind_of_violation(tmp_path: Path) -> None:
    _write(tmp_path, {
        **_CLEAN,
        # An upward import hidden in a function, which also closes a circle (high imports low).
        "pkg/low.py": "def f():\n    from pkg.high import g\n    return 1\n",
        # A private name and a private module of another folder.
        "pkg/other.py": "from pkg.stage.mod import _hidden\nfrom pkg.stage import _private\n",
        # A module of the same tier, and one under TYPE_CHECKING, count too.
        "pkg/high.py": "from typing import TYPE_CHECKING\nfrom pkg.low import f\nif TYPE_CHECKING:\n"
                       "    from pkg import other\n",
        "pkg/big.py": "x = 1\n" * 11,
    })
    problems = check(tmp_path / "pkg", _FAKE_TIERS, max_lines=10, max_top_level=4)
    text = "\n".join(problems)
    assert "low.py:2 pkg.low imports pkg.high.g: against the pipeline's direction (pkg.high is in a higher tier" in text
    assert "import cycle among " in text and "pkg.low (low.py:2) -> pkg.high" in text
    assert "other.py:1 pkg.other imports pkg.stage.mod._hidden: a private name of pkg.stage" in text
    assert "other.py:2 pkg.other imports pkg.stage._private: a private name of pkg.stage" in text
    assert "high.py:4 pkg.high imports pkg.other: against the pipeline's direction (pkg.other is in the same tier" in text
    assert "pkg.big has 11 lines (at most 10)" in text
    assert "pkg.big: its unit pkg.big is in no tier" in text
    assert "5 modules at the top level (at most 4)" in text


# ---------------------------------------------------------------------------------------------
# tpshard itself.


def test_imports_follow_the_pipeline_and_modules_stay_small() -> None:
    problems = check(PACKAGE_ROOT, TIERS)
    assert not problems, "\n".join(problems)


def test_stage_folders() -> None:
    folders = {p.parent.name for p in PACKAGE_ROOT.glob("*/__init__.py")}
    assert {"compiler", "checkpoint", "verify"} <= folders
    assert len(folders - {"layers", "models"}) >= 3
    assert all(any(unit == f"tpshard.{f}" for units in TIERS for unit in units) for f in folders)
