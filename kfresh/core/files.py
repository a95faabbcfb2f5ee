"""File helpers shared by the store snapshots, the model provisioning and the adapter registry."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model and adapter weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (the directory entry itself is fsynced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_dir_once(dest: Path, *, is_current: Callable[[], bool], build: Callable[[Path], object]) -> Path:
    """Build the folder `dest` under an inter-process file lock: `build(tmp)` fills a temp folder beside it,
    which then replaces `dest` with a rename. Racing processes build once and all see the finished result;
    a failed build leaves nothing behind. `is_current()` is checked again once the lock is held."""
    from filelock import FileLock  # comes with transformers / huggingface_hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if is_current():  # another process finished while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            build(tmp)
            if dest.exists():  # a stale build is moved aside first, then deleted
                trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                dest.replace(trash / dest.name)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.replace(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
