"""One benchmark run's record and its three files: <suite>-<date>.json (raw + env + summary), .md, .png."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Result:
    """Everything one suite run produced. `summary` holds the headline figures (ratios first)."""

    suite: str
    title: str
    command: str
    quick: bool
    settings: dict[str, Any]
    env: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Written:
    json: Path
    markdown: Path
    png: Path | None


PlotFn = Callable[[Result, Any], None]  # (result, matplotlib Figure) -> draws into the figure


def write_result(result: Result, out_dir: Path, plot: PlotFn | None = None, *, tag: str = "") -> Written:
    """Write the JSON, Markdown and (when `plot` is given) PNG files of a run, named
    <suite>-<date>[-quick][-tag]; returns their paths."""
    from kfresh.benchmarks.common import load_average

    out_dir.mkdir(parents=True, exist_ok=True)
    result.env["load_average_1m_end"] = round(load_average(), 2)
    name = f"{result.suite}-{time.strftime('%Y-%m-%d')}{'-quick' if result.quick else ''}{'-' + tag if tag else ''}"
    json_path, md_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(asdict(result), indent=1, default=_jsonable) + "\n")
    written_png = None
    if plot is not None:
        written_png = _plot(result, plot, png_path)
    md_path.write_text(markdown(result, png_name=written_png.name if written_png else None))
    return Written(json_path, md_path, written_png)


def markdown(result: Result, *, png_name: str | None = None) -> str:
    env = result.env
    lines = [f"# {result.title}", "",
             f"Command: `{result.command}`{' (quick mode: tiny sizes, not a measurement)' if result.quick else ''}", "",
             f"Machine: {env.get('cpu')}, {env.get('cores')} cores, {env.get('memory_gib')} GiB, GPU: {env.get('gpu')}; "
             f"load average {env.get('load_average_1m_start')} at the start, {env.get('load_average_1m_end')} at the end; "
             f"commit {env.get('commit')}{' (dirty tree)' if env.get('dirty') else ''}; {env.get('date')}.", ""]  # fmt: skip
    for table in result.tables:
        lines += [f"## {table.title}", "", "| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
        lines.append("")
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if png_name:
        lines += [f"![{result.suite}]({png_name})", ""]
    lines += ["Raw samples, settings and versions: the JSON file of the same name.", ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _plot(result: Result, plot: PlotFn, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 4.2), dpi=100)
    try:
        plot(result, fig)
        fig.suptitle(result.title + (" (quick)" if result.quick else ""), fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def series_axes(fig: Any, n: int) -> Sequence[Any]:
    """n side-by-side axes in `fig`."""
    return [fig.add_subplot(1, n, i + 1) for i in range(n)]


def grouped_bars(ax: Any, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]]) -> None:
    """One bar per (series, group), the series side by side within each group, groups labelled on the x axis."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        ax.bar([x + i * width for x in range(len(groups))], list(values), width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], list(groups))
    ax.legend()
