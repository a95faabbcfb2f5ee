"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb into a temp folder, start on a free
loopback port, fresh databases on demand, stopped and removed at the end.

initdb refuses to run as root, so as root every server command runs as the unprivileged `postgres` user
(`runuser -u postgres --`) in a folder it owns. fsync stays on: the store's durability is what is measured.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kfresh.core.net import free_port


def find_pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's /usr/lib/postgresql/N/bin), else initdb on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version, reverse=True)
    if not candidates and (found := shutil.which("initdb")):
        candidates = [os.path.realpath(found)]
    for initdb in candidates:
        folder = Path(initdb).parent
        if (folder / "pg_ctl").is_file():
            return folder
    return None


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.parent.name)
    except ValueError:
        return 0.0


class PgCluster:
    """initdb + pg_ctl on 127.0.0.1:<free port>; `create_database()` returns a DSN to a new, empty database."""

    def __init__(self, bin_dir: Path, parent: Path | None = None) -> None:
        self.bin_dir = bin_dir
        self.as_user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server as") from None
            self.as_user = "postgres"
        # Not under pytest's root-only tmp folders; `parent`: on a given disk (e.g. one a fault test fills).
        self.root = Path(tempfile.mkdtemp(prefix="kfresh-pg-", dir=parent))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._names = itertools.count()
        self.socket_dir.mkdir()
        self.log.touch()
        if self.as_user:
            shutil.chown(self.root, self.as_user)
            for path in (self.socket_dir, self.log):
                shutil.chown(path, self.as_user)

    def _cmd(self, tool: str, *args: str) -> list[str]:
        """A PostgreSQL tool's command line, run as the server's user."""
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", self.as_user, "--", *cmd] if self.as_user else cmd

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{self.log_tail()}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "kfresh", "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-instructions")  # fmt: skip
        self._start()

    def _start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.socket_dir}"
            " -c fsync=on -c synchronous_commit=on -c max_connections=200 -c shared_buffers=32MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():  # immediate: no shutdown checkpoint, the folder goes anyway
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart(self, mode: str = "fast") -> float:
        """pg_ctl restart with `mode` fast (clients disconnected, a clean checkpoint) or immediate (no checkpoint:
        crash recovery at start); returns the seconds until it accepts connections again."""
        started = time.perf_counter()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "-t", "60", "restart")
        return time.perf_counter() - started

    def running(self) -> bool:
        done = subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "status"), capture_output=True, timeout=30,
                              cwd=self.root)  # fmt: skip
        return done.returncode == 0

    def ensure_running(self) -> float | None:
        """Start it again if it stopped (e.g. a PANIC on a full disk, then a failed crash recovery), as an operator
        would; returns the seconds until it accepted connections, or None when it was running."""
        if self.running():
            return None
        started = time.perf_counter()
        self._start()
        return time.perf_counter() - started

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=kfresh dbname={dbname}"

    def create_database(self) -> str:
        """A new empty database (a few tens of ms); returns its DSN."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A running throwaway cluster; yields the DSN of a new, empty database. Needs Debian's postgresql."""
    with postgres_cluster() as cluster:
        yield cluster.create_database()


@contextlib.contextmanager
def postgres_cluster(parent: Path | None = None) -> Iterator[PgCluster]:
    """A running throwaway cluster (stopped and removed afterwards), its files in a new folder under `parent`
    (the temp folder by default). Needs Debian's postgresql."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (or pass a DSN)")
    cluster = PgCluster(bin_dir, parent)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
