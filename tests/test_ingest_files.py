"""Bad files get a clear error and lose nothing: `kfresh ingest` on a corpus of broken files, against a real server.

By default the whole source is checked before anything is sent: any invalid record means FILE:LINE: reason on
stderr, exit 2, and nothing ingested. `--skip-invalid` ingests the valid records and lists the others.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_helper import ServerHandle, server_config
from test_security import CannedBackend

from kfresh.cli import main
from kfresh.client import KfreshClient
from kfresh.client.nats_ingest import parse_message
from kfresh.client.sources import SourceError, read_source

GOOD = '{"id": "f-good-%d", "text": "The lighthouse on Varn opens at %d."}'


@pytest.fixture(scope="module")
def server(engine_loop: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = ServerHandle(engine_loop, server_config(tmp_path_factory.mktemp("files")), CannedBackend())
    yield handle
    handle.stop()


def _documents(server: ServerHandle) -> int:
    with KfreshClient(f"127.0.0.1:{server.port}") as client:
        assert client.wait_searchable(10).searchable
        return int(client.stats().documents)


BROKEN = {
    "bad-json.jsonl": ('{"id": "x", "text": "unclosed', "not valid JSON"),
    "bad-date.jsonl": (
        '{"id": "x", "text": "t", "valid_from": "2025/01/10T12:00:00Z"}',
        "neither unix seconds nor ISO",
    ),
    "id-object.jsonl": ('{"id": {"a": 1}, "text": "t"}', "id must be a string; got dict"),
    "text-list.jsonl": ('{"id": "x", "text": ["t"]}', "text must be a string; got list"),
    "metadata-string.jsonl": ('{"id": "x", "text": "t", "metadata": "lang=en"}', "metadata must be an object"),
    "supersedes-string.jsonl": ('{"id": "x", "text": "t", "supersedes": "old"}', "supersedes must be a list"),
    "valid-from-bool.jsonl": ('{"id": "x", "text": "t", "valid_from": true}', "valid_from must be unix seconds"),
    "array.jsonl": ('["x", "t"]', "expected a JSON object"),
    "huge.jsonl": ('{"id": "x", "text": "' + "y" * 3000 + '"}', "the line is 3,0"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_bad_line_names_file_line_and_reason_and_nothing_is_sent(
    server: ServerHandle, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kfresh.client.sources.MAX_LINE_CHARS", 2000)
    line, reason = BROKEN[name]
    path = tmp_path / name
    path.write_text("\n".join([GOOD % (1, 9), "", line, GOOD % (2, 10)]) + "\n")
    before = _documents(server)
    assert main(["ingest", str(path), "--addr", f"127.0.0.1:{server.port}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: " in err and reason in err, err
    assert "nothing was ingested" in err and "Traceback" not in err and "UNKNOWN" not in err
    assert _documents(server) == before  # not even the good line before it


def test_skip_invalid_ingests_the_good_lines_and_lists_the_bad(
    server: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [GOOD % (10, 9), BROKEN["bad-date.jsonl"][0], GOOD % (11, 9), BROKEN["id-object.jsonl"][0]]
    path.write_text("\n".join(lines) + "\n")
    before = _documents(server)
    assert main(["ingest", str(path), "--addr", f"127.0.0.1:{server.port}", "--quiet", "--skip-invalid"]) == 0
    out, err = capsys.readouterr()
    assert f"{path}:2: " in err and f"{path}:4: " in err
    assert "stored=2" in out and "skipped 2 invalid record(s)" in out
    assert _documents(server) == before + 2


def test_stdin_is_checked_whole_too(
    server: ServerHandle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(GOOD % (20, 9) + "\n{not json}\n"))
    before = _documents(server)
    assert main(["ingest", "-", "--addr", f"127.0.0.1:{server.port}", "--quiet"]) == 2
    assert "<stdin>:2: not valid JSON" in capsys.readouterr().err
    assert _documents(server) == before


def test_unreadable_and_binary_files(server: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "photo.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    addr = ["--addr", f"127.0.0.1:{server.port}", "--quiet"]
    assert main(["ingest", str(binary), *addr]) == 2
    assert "not UTF-8 text (byte 0x89 at offset 0); is it a binary file?" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "missing.jsonl"), *addr]) == 2
    assert "no such file or folder" in capsys.readouterr().err

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "ok.md").write_text("The Varn ferry leaves at noon.")
    (folder / "scan.txt").write_bytes(b"\xff\xd8\xff\xe0 jpeg bytes")
    (folder / "gone.md").symlink_to(tmp_path / "nowhere.md")
    if os.geteuid() != 0:  # root reads anything: the permission case only exists for other users
        locked = folder / "locked.txt"
        locked.write_text("secret")
        locked.chmod(0)
    before = _documents(server)
    assert main(["ingest", str(folder), *addr]) == 2
    err = capsys.readouterr().err
    assert "scan.txt: not UTF-8 text" in err and "gone.md: cannot read it (a link to nothing)" in err
    if os.geteuid() != 0:
        assert "locked.txt: cannot read it (Permission denied)" in err
    assert _documents(server) == before
    assert main(["ingest", str(folder), *addr, "--skip-invalid"]) == 0
    assert _documents(server) == before + 1


def test_read_source_fails_before_the_stream_starts(tmp_path: Path) -> None:
    path = tmp_path / "two-bad.jsonl"
    path.write_text(GOOD % (1, 9) + "\n{}\n[]\n")
    with pytest.raises(SourceError, match=r"2 invalid records:\n  .*two-bad.jsonl:2: missing field") as err:
        read_source(str(path))  # raises here, not from inside a gRPC request iterator
    assert "two-bad.jsonl:3: expected a JSON object" in str(err.value)


def test_nats_dead_letter_reasons_name_the_message() -> None:
    for data, reason in ((b"\xff\xfe", "not UTF-8 text (byte 0xff at offset 0)"), (b"{bad", "not valid JSON"),
                         (b'{"id": "a", "text": "t", "metadata": [1]}', "metadata must be an object"),
                         (b'{"id": "a", "text": "t", "valid_from": "2025/01/10"}', "ISO-8601")):  # fmt: skip
        with pytest.raises(SourceError, match="docs.new#7: ") as err:
            parse_message(data, "docs.new#7")
        assert reason in str(err.value)
