"""The CLI explains itself and fails with clear messages (no server needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kfresh.cli import build_parser, main
from kfresh.client.sources import SourceError, read_source

SUBCOMMANDS = [
    "serve",
    "ingest",
    "ask",
    "retrieve",
    "delete",
    "stats",
    "watch",
    "adapters",
    "demo",
    "distill",
    "provision",
    "config",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    assert "usage: kfresh " + command in capsys.readouterr().out


@pytest.mark.parametrize("action", ["list", "show", "promote", "rollback"])
def test_adapters_actions_have_help_and_client_flags(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["adapters", action, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and f"usage: kfresh adapters {action}" in out
    assert "--addr" in out and "--json" in out


def test_adapters_against_no_server_is_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "rollback", "--addr", "127.0.0.1:1", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_serve_help_lists_settings_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--embedder.max_wait_ms" in out and "--generation.backend {vllm,remote}" in out
    assert "Longest a change waits, from its enqueue" in " ".join(out.split())  # argparse wraps lines


def test_bad_setting_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--retrieval.max_k", "-3"]) == 2
    err = capsys.readouterr().err
    assert "retrieval.max_k" in err and "Traceback" not in err


def test_a_reader_refusal_share_outside_zero_to_one_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["provision", "--reader-refuse-share", "1.5"])
    assert exc.value.code == 2
    assert "--reader-refuse-share: 1.5 is not a share in [0, 1)" in capsys.readouterr().err


def test_list_settings_take_comma_separated_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--finetune.trusted_sources", "port-avel-*, city/*"]) == 0
    assert '"trusted_sources": [\n      "port-avel-*",\n      "city/*"\n    ]' in capsys.readouterr().out


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kfresh.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in SUBCOMMANDS:
        assert command in out


def test_unreachable_server_is_unavailable_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--addr", "127.0.0.1:1", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "Traceback" not in err


def test_jsonl_errors_say_where(tmp_path) -> None:
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\n')
    with pytest.raises(SourceError, match=r"docs.jsonl:2: missing field\(s\) \['text'\]"):
        list(read_source(str(bad)))
    bad.write_text('{"id": "a", "text": "ok", "valid_from": "yesterday"}\n')
    with pytest.raises(SourceError, match="ISO-8601"):
        list(read_source(str(bad)))
