"""The import structure: every ppfr module imports, no import-time cycle, no library module imports the CLI, the
verbs load only when they run, and the extras table matches pyproject.toml.

The import graph is read from the source (ast), so it covers every module, including ones whose optional
dependencies are missing here. An edge is an import that runs when the module is imported: module level, class
bodies, ``try`` / ``if`` blocks, but not function bodies (lazy imports) and not ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ppfr.cli

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (setup.py's package_dir)
PACKAGES = {"ppfr": ROOT / "ppfr", "ppfr.kernels": ROOT / "kernels", "ppfr.pipelines": ROOT / "pipelines"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *rel[:-1])) if rel[-1] == "__init__" else ".".join((pkg, *rel))
            if pkg == "ppfr" and rel[0] in ("kernels", "pipelines"):
                continue  # not a folder of ppfr/ (installed from the top-level folders)
            out[name] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, *, lazy: bool) -> set[str]:
    """The ppfr modules ``name`` imports (at import time; with ``lazy`` also inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def target(mod: str, names: list[str]) -> None:
        for n in names:  # `from pkg import sub` imports the submodule pkg.sub
            if f"{mod}.{n}" in MODULES:
                found.add(f"{mod}.{n}")
            elif mod in MODULES:
                found.add(mod)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in MODULES)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                target(mod, [a.name for a in node.names])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if lazy:
                    visit(node.body)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.ExceptHandler))])
                if isinstance(node, ast.ExceptHandler):
                    visit(node.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def test_the_walk_sees_every_module():
    assert {"ppfr", "ppfr.cli", "ppfr.deploy.server.launch", "ppfr.kernels", "ppfr.pipelines.dali", "ppfr.configs"} - set(
        MODULES
    ) == {"ppfr.configs"}  # configs/ is data, not a module
    assert len(MODULES) > 80


def test_no_import_time_cycle():
    graph = {m: _imports(m, p, lazy=False) for m, p in MODULES.items()}
    assert _cycles(graph) == []
    # the walk does see edges (a regression here would make the assertion above vacuous)
    assert "ppfr.ops.freq" in graph["ppfr"] and "ppfr.data.config" in graph["ppfr.train.config"]


# Cycles through lazy (function-level) imports: not import-time failures, but two rooms that lean on each other.
# The deploy/ split of issue 28 item 3 removed the two there were; this list may only shrink.
KNOWN_LAZY_CYCLES: list[list[str]] = []


def test_no_new_cycle_through_lazy_imports():
    graph = {m: _imports(m, p, lazy=True) for m, p in MODULES.items()}
    assert sorted(_cycles(graph)) == sorted(KNOWN_LAZY_CYCLES)


def test_no_library_module_imports_the_cli():
    offenders = {m: sorted(i for i in _imports(m, p, lazy=True) if i == "ppfr.cli" or i.startswith("ppfr.cli."))
                 for m, p in MODULES.items() if not (m == "ppfr.cli" or m.startswith("ppfr.cli."))}  # fmt: skip
    assert {m: i for m, i in offenders.items() if i} == {}


# The floors: the ops, kernels, models and methods are what the verbs are built from, so none of them may import a
# verb's room (not even lazily): a method that reached into ppfr.deploy would tie the method boundary to the server.
LOWER_FLOORS = ("ppfr.ops", "ppfr.kernels", "ppfr.models", "ppfr.methods")
UPPER_ROOMS = ("ppfr.deploy", "ppfr.cli", "ppfr.study", "ppfr.eval", "ppfr.train")


def _in(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_lower_floors_import_no_upper_room():
    graph = {m: _imports(m, p, lazy=True) for m, p in MODULES.items() if _in(m, LOWER_FLOORS)}
    assert len(graph) > 20 and "ppfr.methods.base" in graph  # the walk sees the floors
    offenders = {m: sorted(i for i in imported if _in(i, UPPER_ROOMS)) for m, imported in graph.items()}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_layering_check_can_fail(tmp_path):
    """The walk finds an upward import where there is one, lazy ones included (the check above is not vacuous)."""
    path = tmp_path / "upward.py"
    path.write_text("import torch\n\ndef f():\n    from ppfr.deploy.protocol import validate\n")
    found = _imports("ppfr.methods.upward", path, lazy=True)
    assert found == {"ppfr.deploy.protocol"} and _in("ppfr.deploy.protocol", UPPER_ROOMS)
    assert _imports("ppfr.methods.upward", path, lazy=False) == set()


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(name):
    importlib.import_module(name)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_verbs_are_imported_only_when_they_run():
    """``import ppfr.cli`` (what the ``ppfr`` script does before it parses) loads no verb; ``ppfr info`` loads
    none of the other verbs."""
    code = (
        "import sys, io, contextlib, ppfr.cli\n"
        "verbs = {v.module for v in ppfr.cli.VERBS.values()}\n"
        "print(sorted(verbs & set(sys.modules)))\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = ppfr.cli.main(['info', '--json'])\n"
        "print(rc, sorted(verbs & set(sys.modules)))\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "0 ['ppfr.info']"]


def test_a_verb_whose_extra_is_missing_exits_2_naming_the_extra():
    """msgpack made unimportable (as where ppfr[serve] is not installed): one line, exit 2, no traceback."""
    code = ("import sys; sys.modules['msgpack'] = None\n"
            "import ppfr.cli\n"
            "sys.exit(ppfr.cli.main(['serve', 'model.pt', '--gallery', 'g']))\n")  # fmt: skip
    out = _run(code)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "pip install 'ppfr[serve]'" in out.stderr, out.stderr


@pytest.mark.parametrize("verb", sorted(ppfr.cli.VERBS))
def test_every_verb_has_its_own_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        ppfr.cli.main([verb, "-h"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ppfr {verb}")


def test_python_dash_m_ppfr_cli():
    out = subprocess.run([sys.executable, "-m", "ppfr.cli", "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == f"ppfr {ppfr.__version__}", out


def _dist(req: str) -> str:
    """'tritonclient[grpc]>=2.40' -> 'tritonclient'."""
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()


def test_extras_table_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from ppfr import _extras

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    rooms = {k: v for k, v in extras.items() if k not in ("all", "test", "triton")}
    assert {k: sorted(map(_dist, v)) for k, v in rooms.items()} == {
        k: sorted(v) for k, v in _extras.EXTRAS.items()}  # fmt: skip
    assert extras["all"] == [f"ppfr[{','.join(_extras.EXTRAS)}]"]
    core = {_dist(r) for r in project["dependencies"]}
    assert core == {"torch", "numpy", "pyyaml", "pillow"}
    # every extra is present in the CI environment (requirements.txt installs them all)
    assert {k: v for k, v in _extras.status().items() if v} == {}
    assert _extras.extra_for("msgpack") == "serve" and _extras.extra_for("nvidia") == "data"
    assert _extras.extra_for("tritonclient") == "fleet" and _extras.extra_for("torch") is None
