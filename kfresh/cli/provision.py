"""Setup commands: provision (models), demo (the end-to-end walk-through), config (the effective settings)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kfresh.cli.common import (
    add_config_flags,
    config_from,
    print_json,
)


def cmd_demo(args: argparse.Namespace) -> int:
    from kfresh.cli.demo import run_demo

    return run_demo(config_from(args), keep=args.keep)


def cmd_provision(args: argparse.Namespace) -> int:
    from kfresh.core.logs import setup_logging
    from kfresh.provisioning import provision

    setup_logging("INFO")
    cfg = config_from(args)
    result = provision(cfg)
    if args.reader_data:
        from kfresh.provisioning import provision_reader

        dest = Path(args.reader_out).expanduser().resolve() if args.reader_out else None
        built = provision_reader(
            cfg, args.reader_data, args.reader_until, dest=dest, budget_s=args.reader_budget_s,
            refuse_share=args.reader_refuse_share,
        )  # fmt: skip
        result.update(built)
    print_json({k: str(v) for k, v in result.items()})
    return 0


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share in [0, 1)")
    return value


def cmd_config(args: argparse.Namespace) -> int:
    print(config_from(args).model_dump_json(indent=2))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="start a server, stream a changing corpus, ask before/after a correction",
        description="End-to-end demo on the shipped sample corpus, in a temporary data folder.",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data folder and server log")
    add_config_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "provision",
        help="prepare the models (convert the packaged GGUF once)",
        description="Resolve the embedder and convert the generator into a local Hugging Face folder (cached). "
        "With --reader-data, also train the reader (a LoRA merged into the generator that answers from the served "
        "prompt; README: Reading) on a reading set, once (~25 min on 2 cores), and print its folder.",
    )
    p.add_argument(
        "--reader-data",
        metavar="FILE",
        default="",
        help="reading set (JSONL: question, evidence, date, answer or choices+answer), e.g. "
        "../shared/datasets/realtimeqa-2025.jsonl; rows that are documents (id, text, valid_from, as for "
        "`kfresh ingest`) become questions built around their names, dates and numbers",
    )
    p.add_argument(
        "--reader-out",
        metavar="DIR",
        default="",
        help="where the reader goes (default: <models.cache_dir>/<generator>-reader)",
    )
    p.add_argument(
        "--reader-until",
        metavar="DATE",
        default="",
        help="train only on rows dated up to DATE (YYYY-MM-DD), so later rows can be reported on; default: all",
    )
    p.add_argument(
        "--reader-budget-s",
        metavar="S",
        type=float,
        default=None,
        help="the reader's training time budget in seconds (default 1500; a shorter one trains less)",
    )
    p.add_argument(
        "--reader-refuse-share",
        metavar="P",
        type=_share,
        default=None,
        help="share of rows shown without their evidence (its two nearest other passages) and answered 'I could not "
        "find this in the documents.' (default 0; 0.2 refused 46%% of questions whose evidence was deleted but 32%% "
        "of answerable ones, README: Reading)",
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser(
        "config",
        help="print the effective configuration as JSON",
        description="Print the configuration after defaults, kfresh.toml, KFRESH_* and flags.",
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_config)
