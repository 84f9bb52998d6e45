"""Real PostgreSQL and Redis for tests and benchmarks.

Both come from Debian's packages (``scripts/test-services install`` puts them
there; ``make test`` calls it).  Each server runs in a temporary folder on a
private loopback port, as a child of this process, and is stopped by its pid:

    with PostgresServer.start() as pg, RedisServer.start() as redis:
        url = pg.create_database()          # postgresql+asyncpg://... (empty)
        redis.url                           # redis://127.0.0.1:PORT/0
        redis.stop(); redis.resume()        # down, then back on the same port

PostgreSQL refuses to run as root, so when we are root the postmaster runs as
the ``postgres`` system user (created with the package), or as a dedicated
``modelfleet-test`` user made with ``useradd`` where that user is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = ROOT / "scripts" / "test-services"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin() -> Path | None:
    """The newest Debian PostgreSQL's bin folder, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def ensure_installed() -> None:
    """Install Debian's postgresql and redis-server if either is missing (fast
    when both are there: nothing runs)."""
    if _pg_bin() is None or shutil.which("redis-server") is None:
        subprocess.run([str(INSTALL_SCRIPT), "install"], check=True)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not listen on {port}: {log.read_text(errors='replace')}")
        time.sleep(0.02)


def _dies_with_us(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn: Linux sends the child ``sig`` when the thread that
    started it ends, so a test run killed with -9 leaves no server behind.
    (Start servers from a thread that lives as long as they should.)"""
    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # 1: PR_SET_PDEATHSIG

    return arm


def _stop(proc: subprocess.Popen[Any], sig: signal.Signals, timeout: float = 10.0) -> None:
    """Stop the process we started, by its pid; SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- PostgreSQL ---------------------------------------------------------------------


def _service_user() -> pwd.struct_passwd | None:
    """Who runs the postmaster: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "modelfleet-test"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "modelfleet-test"], check=True)
    return pwd.getpwnam("modelfleet-test")


class PostgresServer:
    """A throw-away PostgreSQL cluster: trust auth on 127.0.0.1 only, no fsync."""

    superuser = "postgres"

    def __init__(self, root: Path, port: int, proc: subprocess.Popen[bytes],
                 user: pwd.struct_passwd | None, bin_dir: Path) -> None:
        self.root = root
        self.port = port
        self.proc = proc
        self._user = user
        self._bin = bin_dir
        self._names = itertools.count(1)
        # The next empty database, being made in the background by a psql of ours.
        self._next: tuple[str, subprocess.Popen[str]] | None = None

    @classmethod
    def start(cls, port: int | None = None) -> PostgresServer:
        ensure_installed()
        bin_dir = _pg_bin()
        assert bin_dir is not None
        user = _service_user()
        # Not under pytest's tmp folders: those are 0700 root, closed to the service user.
        root = Path(tempfile.mkdtemp(prefix="modelfleet-pg-"))
        try:
            if user is not None:
                os.chown(root, user.pw_uid, user.pw_gid)
            data = root / "data"
            cls._run(user, [str(bin_dir / "initdb"), "-D", str(data), "-U", cls.superuser,
                            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"], root)
            return cls._launch(root, port or free_port(), user, bin_dir)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    @staticmethod
    def _run(user: pwd.struct_passwd | None, argv: list[str], cwd: Path) -> None:
        out = subprocess.run(argv, capture_output=True, text=True, env=_pg_env(user), cwd=cwd,
                             **_as(user))
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {out.stdout}\n{out.stderr}")

    @classmethod
    def _launch(cls, root: Path, port: int, user: pwd.struct_passwd | None,
                bin_dir: Path) -> PostgresServer:
        log = root / "postgres.log"
        with open(log, "ab") as out:
            if user is not None:
                os.chown(log, user.pw_uid, user.pw_gid)
            # Speed over durability: the data is thrown away at the end.
            proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port),
                 "-h", "127.0.0.1", "-k", str(root), "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=300", "-c", "shared_buffers=64MB",
                 "-c", "logging_collector=off", "-c", "log_min_messages=warning"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=_pg_env(user), cwd=root,
                preexec_fn=_dies_with_us(signal.SIGQUIT), **_as(user),
            )
        server = cls(root, port, proc, user, bin_dir)
        try:
            _wait_port(port, proc, log, timeout=30)
            server._wait_ready(log)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, log: Path) -> None:
        deadline = time.monotonic() + 30
        while self.psql("SELECT 1", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres is not ready: {log.read_text(errors='replace')}")
            time.sleep(0.05)

    def _psql_argv(self, sql: str, database: str) -> list[str]:
        return [str(self._bin / "psql"), "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser, "-d", database,
                "-c", sql]

    def psql(self, sql: str, *, database: str = "postgres",
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run SQL as the superuser with Debian's ``psql`` (tab-separated rows out)."""
        out = subprocess.run(self._psql_argv(sql, database), capture_output=True, text=True,
                             timeout=60, env=_psql_env())
        if check and out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out

    def url(self, database: str, driver: str = "asyncpg") -> str:
        return f"postgresql+{driver}://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def _spawn_create(self) -> tuple[str, subprocess.Popen[str]]:
        name = f"t{os.getpid()}_{next(self._names)}"
        proc = subprocess.Popen(self._psql_argv(f'CREATE DATABASE "{name}" TEMPLATE template0',
                                                "postgres"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_psql_env())
        return name, proc

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its ``postgresql+asyncpg://`` URL.

        Without a name, the database was made in the background after the last
        call (CREATE DATABASE takes about 0.2 s), and the next one is started."""
        if name is not None:
            self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
            return self.url(name)
        name, proc = self._next or self._spawn_create()
        self._next = None
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"CREATE DATABASE failed: {err}")
        self._next = self._spawn_create()
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def dump(self, database: str) -> str:
        """``pg_dump`` of one database as SQL text (what an attacker with the
        store would read)."""
        out = subprocess.run(
            [str(self._bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.superuser, database],
            capture_output=True, text=True, timeout=60, env=_psql_env(), check=True,
        )
        return out.stdout

    def stop(self) -> None:
        """Immediate shutdown of the postmaster we started (by its pid), then
        remove its folder."""
        if self._next is not None:
            _stop(self._next[1], signal.SIGTERM)
            self._next[1].communicate()
            self._next = None
        _stop(self.proc, signal.SIGQUIT)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Ids(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def _as(user: pwd.struct_passwd | None) -> _Ids:
    """Popen arguments that run the child as ``user`` (with no extra groups)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _psql_env() -> dict[str, str]:
    return {**os.environ, "PGCONNECT_TIMEOUT": "5"}


def _pg_env(user: pwd.struct_passwd | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    if user is not None:
        env["HOME"] = user.pw_dir
        env["USER"] = user.pw_name
    return env


# -- Redis --------------------------------------------------------------------------


class RedisServer:
    """A throw-away ``redis-server``: loopback only, no persistence.  ``stop``
    then ``resume`` brings the same server back on the same port (empty), for
    tests of an outage."""

    DATABASES = 1024

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self._dbs = itertools.count(1)

    @classmethod
    def start(cls, port: int | None = None) -> RedisServer:
        ensure_installed()
        server = cls(Path(tempfile.mkdtemp(prefix="modelfleet-redis-")), port or free_port())
        try:
            server.resume()
        except BaseException:
            server.close()
            raise
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def resume(self) -> None:
        """Start the server on its port (empty); nothing when it runs."""
        if self.running:
            return
        log = self.root / "redis.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--dir", str(self.root), "--databases", str(self.DATABASES),
                 "--loglevel", "warning"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.root, preexec_fn=_dies_with_us(signal.SIGKILL),
            )
        try:
            _wait_port(self.port, self.proc, log, timeout=15)
        except BaseException:
            self.stop()
            raise

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server by its pid: SIGTERM, or SIGKILL to look like a crash."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL if kill else signal.SIGTERM)
            self.proc = None

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.resume()

    def fresh_url(self) -> str:
        """The URL of a database index not handed out lately, emptied.  (Pub/sub
        channels are server-wide: they are not separated by the index.)"""
        index = next(self._dbs) % self.DATABASES
        self.flush(index)
        return f"redis://127.0.0.1:{self.port}/{index}"

    def flush(self, index: int | None = None) -> None:
        """FLUSHDB of one index, or FLUSHALL."""
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, db=index or 0) as client:
            if index is None:
                client.flushall()
            else:
                client.flushdb()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextlib.contextmanager
def services() -> Iterator[tuple[PostgresServer, RedisServer]]:
    """Both servers for a script (a benchmark); stopped on exit."""
    with PostgresServer.start() as pg, RedisServer.start() as redis:
        yield pg, redis
