"""The committed stubs must match proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
GENERATED = ("kfresh_pb2.py", "kfresh_pb2.pyi", "kfresh_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(PROTO / "kfresh/v1/kfresh.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "kfresh/v1" / name).read_text()
        committed = (PROTO / "kfresh/v1" / name).read_text()
        assert fresh == committed, f"proto/kfresh/v1/{name} is stale: run `make proto`"


def test_package_is_versioned() -> None:
    from kfresh.v1 import kfresh_pb2

    assert kfresh_pb2.DESCRIPTOR.package == "kfresh.v1"
    assert "Kfresh" in kfresh_pb2.DESCRIPTOR.services_by_name
