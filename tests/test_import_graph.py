"""The house rules, checked on the package as installed (tests/import_graph.py builds it with grimp)."""

from __future__ import annotations

from pathlib import Path

import import_graph as ig
import pytest


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> ig.GraphFigures:
    return ig.measure(ig.installed_layout(tmp_path_factory.mktemp("layout")))


def test_the_package_has_no_import_circle(figures: ig.GraphFigures) -> None:
    assert figures.modules > 100, "the layout copy lost modules: check pyproject's package-dir"
    assert figures.circles == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in figures.circles)


def test_every_import_follows_the_dependency_rule(figures: ig.GraphFigures) -> None:
    assert figures.breaks == [], "imports against the rule (ARCHITECTURE.md, 'The dependency rule'):\n" + "\n".join(
        figures.breaks
    )


def test_every_module_belongs_to_exactly_one_layer(figures: ig.GraphFigures) -> None:
    names = [name for layer in ig.LAYERS for name in layer]
    assert len(names) == len(set(names)), "a package is listed in two layers"
    assert not [b for b in figures.breaks if "in no layer" in b]


def test_the_check_catches_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checker is not vacuous: plant a finetuner -> server import and a core <-> core circle in a copy."""
    layout = ig.installed_layout(tmp_path)
    (layout / "kfresh" / "finetuner" / "planted.py").write_text("from kfresh.server import answerer\n")
    (layout / "kfresh" / "core" / "planted_a.py").write_text("from kfresh.core import planted_b\n")
    (layout / "kfresh" / "core" / "planted_b.py").write_text("from kfresh.core import planted_a\n")
    (layout / "kfresh_tests" / "test_planted.py").write_text("from kfresh.benchmarks import reading\n")
    planted = ig.measure(layout)
    assert ["kfresh.core.planted_a", "kfresh.core.planted_b"] in planted.circles
    assert "kfresh.finetuner.planted -> kfresh.server.answerer (imports upward)" in planted.breaks
    assert any(b.startswith("kfresh_tests.test_planted -> kfresh.benchmarks") for b in planted.breaks)
