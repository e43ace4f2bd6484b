"""A real PostgreSQL server and an `mlflow server` on it, as a team would run them: each on a
free 127.0.0.1 port with its files in a temporary directory, stopped at the end of the session.
Their logs are attached to every failing test that used them."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_USER = "mlflow"
PG_DATABASE = "mlflow"
START_TIMEOUT_S = 60
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin or on "
    "PATH; install them (Debian/Ubuntu: `apt-get install postgresql`) to run the tracking-server "
    "tests"
)


def postgres_bindir() -> Path | None:
    """Debian keeps the server binaries off PATH, in a directory per major version."""
    versioned = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("initdb")
    candidates = [Path(d) for d in versioned] + ([Path(on_path).parent] if on_path else [])
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else "(no log written)"
    return text[-chars:]


@dataclass
class Server:
    """A process we started in its own session (so no worker of it outlives `stop`) and its
    log."""

    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def fail(self, why: str) -> None:
        pytest.fail(f"{self.name} {why}; its log:\n{log_tail(self.log)}", pytrace=False)


def start(name: str, cmd: list[str], log: Path, **kwargs) -> Server:
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
    return Server(name, process, log)


def wait_until(server: Server, ready, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if server.process.poll() is not None:
            server.fail(f"exited with code {server.process.returncode} before {what}")
        if time.monotonic() > deadline:
            server.stop()
            server.fail(f"was not {what} after {START_TIMEOUT_S} s")
        time.sleep(0.2)


@dataclass
class Postgres:
    server: Server
    url: str  # SQLAlchemy URL of the `mlflow` database

    def connect(self):
        import psycopg2

        return psycopg2.connect(self.url)


@dataclass
class MlflowServer:
    server: Server
    uri: str
    artifacts: Path
    postgres: Postgres | None = None


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """initdb refuses to run as root, so as root the server runs as the `postgres` user, in a
    directory of /tmp it owns (pytest's tmp_path is private to root)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(INSTALL_HINT)
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip(
                "running as root and there is no `postgres` user to run PostgreSQL as "
                "(Debian's `apt-get install postgresql` creates it)"
            )
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                   "--init-groups"]  # fmt: skip
    port = free_port()
    initdb = subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(root / "data"), "-U", PG_USER,
         "--auth=trust", "-E", "UTF8", "--no-sync"],
        capture_output=True, text=True,
    )  # fmt: skip
    if initdb.returncode != 0:
        shutil.rmtree(root)
        pytest.fail(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}", pytrace=False)
    server = start(
        "postgres",
        [*as_user, str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        root / "postgres.log",
    )  # fmt: skip
    admin = Postgres(server, f"postgresql://{PG_USER}@127.0.0.1:{port}/postgres")
    try:
        wait_until(server, lambda: _accepts_connections(admin), "accepting connections")
        connection = admin.connect()
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {PG_DATABASE}")
        connection.close()
        yield Postgres(server, f"postgresql://{PG_USER}@127.0.0.1:{port}/{PG_DATABASE}")
    finally:
        server.stop(signal.SIGINT)  # postgres' "fast" shutdown
        shutil.rmtree(root, ignore_errors=True)


def _accepts_connections(postgres: Postgres) -> bool:
    import psycopg2

    try:
        postgres.connect().close()
    except psycopg2.OperationalError:
        return False
    return True


def start_mlflow(root: Path, backend: str, *options: str) -> tuple[Server, str]:
    """`mlflow server` on `backend`, on a free 127.0.0.1 port, run in `root` with its log there;
    returns once it answers /health (stopped if it never does)."""
    port = free_port()
    server = start(
        "mlflow server",
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend,
         "--host", "127.0.0.1", "--port", str(port), *options],
        root / "mlflow-server.log",
        cwd=root,
        # its GenAI job runner is unused here, and leaves a directory in /dev/shm per start
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(server, lambda: _healthy(uri), "healthy")
    except BaseException:
        server.stop()
        raise
    return server, uri


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """The tracking server with the PostgreSQL backend store, proxying artifacts to a local
    directory, as README's "Tracking for a team" runs it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    options = ("--artifacts-destination", str(root / "artifacts"), "--workers", "2")
    server, uri = start_mlflow(root, postgres.url, *options)
    try:
        yield MlflowServer(server, uri, root / "artifacts", postgres)
    finally:
        server.stop()


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    """A test's own sqlite tracking store (created on first use)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def mlflow_ui(sqlite_uri, tmp_path) -> Iterator[MlflowServer]:
    """`mlflow server`, the UI a user opens, over the test's sqlite store."""
    root = tmp_path / "mlflow-ui"
    root.mkdir()
    server, uri = start_mlflow(root, sqlite_uri, "--workers", "1")
    try:
        yield MlflowServer(server, uri, root / "mlartifacts")
    finally:
        server.stop()


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        used = getattr(item, "funcargs", {}).values()
        servers = {v.server.name: v.server for v in used if isinstance(v, (MlflowServer, Postgres))}
        for name, server in servers.items():
            report.sections.append((f"{name} log (tail)", log_tail(server.log)))
    return report
