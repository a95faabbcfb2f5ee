"""A small disk that a fault test can fill: a tmpfs of a fixed size mounted on a folder (needs root).

`fill()` takes every free byte with a ballast file, so the next write of anything living there fails with
ENOSPC, as on a full disk; `free()` removes it. Everything on it is lost at `close()` (unmounted).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


class DiskUnavailable(RuntimeError):
    """No small disk here (not root, or mounting a tmpfs was refused): the reason is the message."""


class SmallDisk:
    def __init__(self, path: Path, size_mb: int) -> None:
        self.path, self.size_mb = path, size_mb
        self.ballast = path / "ballast"

    def mount(self) -> None:
        if os.geteuid() != 0:
            raise DiskUnavailable("a small disk needs root (mount -t tmpfs)")
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=1777", "tmpfs",
                               str(self.path)], capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise DiskUnavailable(f"mount -t tmpfs refused: {done.stderr.strip() or done.returncode}")

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Take every free byte; returns how many the ballast holds."""
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with contextlib.suppress(OSError):  # most of it at once; all or nothing
                os.posix_fallocate(fd, os.fstat(fd).st_size, max(self.free_bytes() - 2**20, 1))
            chunk = 1 << 16
            zeros = bytes(chunk)
            while chunk:  # the rest, unbuffered, down to the last byte
                try:
                    os.write(fd, zeros[:chunk])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def close(self) -> None:
        self.free()
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int) -> Iterator[SmallDisk]:
    """A mounted SmallDisk (unmounted afterwards); raises DiskUnavailable where it cannot be had."""
    disk = SmallDisk(path, size_mb)
    disk.mount()
    try:
        yield disk
    finally:
        disk.close()
