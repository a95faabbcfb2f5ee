"""`kfresh bench SUITE`: run a benchmark suite and write its JSON, Markdown and PNG into --out."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUITES = (
    "ingest",
    "freshness",
    "retrieval",
    "answer",
    "knowledge",
    "backends",
    "replicas",
    "reading",
    "transfer",
    "knowledge_news",
    "filters",
    "history",
    "newest_wins",
    "conflicts",
    "chaos",
)
_OPTIONS = {"ingest": "IngestOptions", "freshness": "FreshnessOptions", "retrieval": "RetrievalOptions",
            "answer": "AnswerOptions", "knowledge": "KnowledgeOptions", "backends": "BackendsOptions",
            "replicas": "ReplicasOptions", "reading": "ReadingOptions",
            "transfer": "TransferOptions", "knowledge_news": "NewsKnowledgeOptions",
            "filters": "FiltersOptions", "history": "HistoryOptions", "newest_wins": "NewestWinsOptions",
            "conflicts": "ConflictsOptions", "chaos": "ChaosOptions"}  # fmt: skip


def suite_module(name: str) -> Any:
    return importlib.import_module(f"kfresh.benchmarks.{name}")


def _epilog() -> str:
    parts = ["suites (each writes benchmarks/results/<suite>-<date>.json/.md/.png):"]
    for name in SUITES:
        module = suite_module(name)
        first = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        parts.append(
            textwrap.fill(f"{name}: {first.split(': ', 1)[-1]}", 100, initial_indent="  ", subsequent_indent="    ")
        )
        options = getattr(module, _OPTIONS[name])
        quick = options.quick()
        for field, info in options.model_fields.items():
            default = info.default_factory() if info.default_factory is not None else info.default
            parts.append(
                f"      --set {field}=...  {info.description} [full: {_show(default)}; quick: {_show(getattr(quick, field))}]"
            )
    parts.append("  all: every suite above, one after the other (full sizes take about an hour on 2 cores)")
    return "\n".join(parts)


def _show(value: Any) -> str:
    """A default as JSON; nested option models (the reading suite's variants) by their name."""
    return json.dumps(value, default=lambda o: getattr(o, "name", str(o)))


def register(sub: Any) -> None:
    """Add the `bench` subcommand to kfresh's argparse subparsers."""
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (ingest, freshness, retrieval, answer, knowledge, backends, replicas, reading, transfer, knowledge_news, all) against a baseline",
        description="Run a benchmark suite against a server it starts itself (or --addr), side by side with a baseline "
        "in the same run; write the raw samples, environment and summary as JSON, a Markdown table and PNG plots.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", choices=[*SUITES, "all"], help="which suite")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test); figures are not measurements")
    p.add_argument(
        "--addr", default=None, help="measure an already running server at host:port instead of starting one"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results, or a temp folder with --quick)",
    )
    p.add_argument(
        "--tag",
        default="",
        help="suffix of the result files, e.g. 'ivf' -> <suite>-<date>-ivf.json (a variant run beside the default one)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override an option of the suite (not with 'all'), e.g. --set 'sizes=[10000]'",
    )
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each suite, wait up to SECONDS for the 1-minute load average to drop below --quiet-load; "
                   "skip the suite if it does not (for shared boxes; default 0 = start at once)")  # fmt: skip
    p.add_argument("--quiet-load", type=float, default=1.2, help="load average that counts as quiet (default 1.2)")
    p.set_defaults(func=main)


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=JSON, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run_suite(name: str, *, quick: bool = False, addr: str | None = None, out: Path | None = None,
              overrides: dict[str, Any] | None = None, command: str = "", tag: str = "") -> Any:  # fmt: skip
    """Run one suite and write its files (named <suite>-<date>[-quick][-tag]); returns report.Written."""
    from kfresh.benchmarks.report import write_result

    module = suite_module(name)
    options_cls = getattr(module, _OPTIONS[name])
    base = options_cls.quick() if quick else options_cls()
    opts = options_cls.model_validate({**base.model_dump(), **(overrides or {})})
    result = module.run(
        opts, addr=addr, quick=quick, command=command or f"kfresh bench {name}{' --quick' if quick else ''}"
    )
    return write_result(result, out or _default_out(quick), module.plot, tag=tag)


def wait_quiet(seconds: float, threshold: float) -> bool:
    """True once the 1-minute load average is below `threshold`; False if it is not within `seconds`."""
    import os
    import time

    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= threshold:
        if time.monotonic() > deadline:
            return False
        time.sleep(5)
    return True


def _default_out(quick: bool) -> Path:
    if quick:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="kfresh-bench-quick-"))
    from kfresh.benchmarks.common import RESULTS_DIR

    return RESULTS_DIR


def main(args: argparse.Namespace) -> int:
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_sets(args.set)
    if overrides and args.suite == "all":
        raise SystemExit("--set applies to one suite; run the suites one by one to override their options")
    command = "kfresh " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ""
    for name in SUITES if args.suite == "all" else (args.suite,):
        if args.wait_quiet and not wait_quiet(args.wait_quiet, args.quiet_load):
            print(
                f"kfresh bench {name}: skipped, the load average stayed above {args.quiet_load} for {args.wait_quiet:.0f} s",
                file=sys.stderr,
            )
            continue
        if args.tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", args.tag):
            raise SystemExit(f"--tag must be letters, digits, '.', '_' or '-' (at most 41), got {args.tag!r}")
        written = run_suite(name, quick=args.quick, addr=args.addr, out=args.out, overrides=overrides, tag=args.tag,
                            command=command.replace(" all", f" {name}") if args.suite == "all" else command)  # fmt: skip
        print(written.markdown.read_text())
        print(
            f"wrote {written.json}, {written.markdown}" + (f", {written.png}" if written.png else ""), file=sys.stderr
        )
    return 0
