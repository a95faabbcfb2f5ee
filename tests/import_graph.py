"""The import graph of kfresh as installed, built with grimp, and the dependency rule it must keep.

The source tree is not the installed layout (`server/` is `kfresh.server`, `proto/kfresh/v1/` is `kfresh.v1`, ...:
pyproject's `package-dir`), and grimp reads files, not the editable finder. So the tree is copied into a
folder laid out as installed, from pyproject's own mapping, and the test modules beside it as the package
`kfresh_tests`. `python tests/import_graph.py` prints the figures (modules, arrows, circles, rule breaks).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS_PACKAGE = "kfresh_tests"

# The dependency rule, top to bottom: a module may import from its own layer or any layer below, never above.
# Entries of one layer are independent of each other (the client SDK never imports provisioning, and so on).
# The benchmark suites are the top; the harness (kfresh.testing) starts real servers and clusters for both
# the tests and the benchmarks; the server composes the finetuner's scheduler and reads its adapter
# registry; the finetuner never imports the server; the prompt format is the contract both speak.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kfresh.benchmarks",),
    ("kfresh.cli",),
    ("kfresh.testing", "kfresh.demo"),
    ("kfresh.provisioning",),
    ("kfresh.server",),
    ("kfresh.finetuner",),
    ("kfresh.prompt",),
    ("kfresh.indexer",),
    ("kfresh.client", "kfresh.models"),
    ("kfresh.core",),
    ("kfresh.v1",),
)


@functools.cache
def _setuptools_config() -> dict[str, Any]:
    """pyproject's [tool.setuptools]: the packages and the folders they are installed from (read once)."""
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"])


def installed_layout(dest: Path) -> Path:
    """Copy the package's .py files into `dest` as pyproject installs them, the tests as `kfresh_tests`."""
    setuptools_cfg = _setuptools_config()
    package_dir: dict[str, str] = setuptools_cfg["package-dir"]
    for package in setuptools_cfg["packages"]:
        source = ROOT / _source_dir(package, package_dir)
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for py in [*source.glob("*.py"), *source.glob("*.pyi")]:  # the stubs are for the type checker
            shutil.copy2(py, target / py.name)
    tests = dest / TESTS_PACKAGE
    tests.mkdir()
    (tests / "__init__.py").write_text("")
    for py in (ROOT / "tests").glob("*.py"):
        shutil.copy2(py, tests / py.name)
    return dest


def _source_dir(package: str, package_dir: dict[str, str]) -> str:
    """Where setuptools finds `package`: its own entry, else its nearest mapped parent's folder plus the rest."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        parent = ".".join(parts[:cut])
        if parent in package_dir:
            return "/".join([package_dir[parent], *parts[cut:]])
    return "/".join(parts)


def source_path(layout_path: str) -> str:
    """The source file (relative to the repository) of a path in the installed layout, e.g.
    'kfresh/server/app.py' -> 'server/app.py'."""
    setuptools_cfg = _setuptools_config()
    folder, _, name = layout_path.rpartition("/")
    return f"{_source_dir(folder.replace('/', '.'), setuptools_cfg['package-dir'])}/{name}"


@dataclass
class GraphFigures:
    modules: int
    arrows: int
    circles: list[list[str]]
    breaks: list[str] = field(default_factory=list)  # "importer -> imported (why)"


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> int | None:
    for rank, layer in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in layer):
            return rank
    return None


def _layer_name(module: str) -> str | None:
    for layer in LAYERS:
        for name in layer:
            if module == name or module.startswith(name + "."):
                return name
    return None


def rule_breaks(edges: dict[str, set[str]]) -> list[str]:
    breaks = []
    for importer, imported_set in sorted(edges.items()):
        for imported in sorted(imported_set):
            if importer.startswith(TESTS_PACKAGE + "."):
                short = importer.split(".", 1)[1]
                if imported.startswith("kfresh.benchmarks") and not short.startswith("test_bench"):
                    breaks.append(f"{importer} -> {imported} (only test_bench*.py tests the benchmarks)")
                continue
            low, high = layer_of(importer), layer_of(imported)
            if low is None:
                if importer not in ("kfresh", "kfresh.__init__"):
                    breaks.append(f"{importer} -> {imported} (module in no layer)")
                continue
            if high is None:
                if imported != "kfresh":
                    breaks.append(f"{importer} -> {imported} (module in no layer)")
                continue
            if high < low:
                breaks.append(f"{importer} -> {imported} (imports upward)")
            elif high == low and _layer_name(importer) != _layer_name(imported):
                breaks.append(f"{importer} -> {imported} (independent siblings)")
    return breaks


def measure(layout: Path) -> GraphFigures:
    """Build the graph of `layout` (from installed_layout) in a fresh interpreter whose path starts there."""
    code = (
        "import grimp, json, sys\n"
        f"g = grimp.build_graph('kfresh', {TESTS_PACKAGE!r}, include_external_packages=False)\n"
        "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=layout,
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(layout), "PATH": "/usr/bin:/bin"},
    ).stdout
    edges = {module: set(imported) for module, imported in json.loads(out).items()}
    package = {m: i for m, i in edges.items() if not m.startswith(TESTS_PACKAGE)}
    return GraphFigures(
        modules=len(package),
        arrows=sum(len({i for i in imported if not i.startswith(TESTS_PACKAGE)}) for imported in package.values()),
        circles=_circles(edges),
        breaks=rule_breaks(edges),
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(installed_layout(Path(tmp)))
    print(
        f"modules {figures.modules}, arrows {figures.arrows}, circles {len(figures.circles)}, "
        f"rule breaks {len(figures.breaks)}"
    )
    for circle in figures.circles:
        print("circle:", " <-> ".join(circle))
    for line in figures.breaks:
        print("break:", line)
