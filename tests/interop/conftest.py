"""Fixtures for the matrix-nio interop suite.

``homeserver`` runs a real Switchboard binary on a free loopback port in a
temporary directory; ``clients`` hands out nio ``AsyncClient``s against it
and closes them all at teardown.

``app_service_registrations`` lists the application services the
``homeserver`` fixture registers (none by default); a test module overrides
that fixture to run the server with its own services.

Environment:
    SWITCHBOARD_BIN            path to the server binary (default: target/debug/switchboard)
    RUST_LOG                   passed through to the server (default: info)
    SWITCHBOARD_TEST_DATABASE  `postgres`: each Switchboard homeserver gets a fresh PostgreSQL
                               database, dropped at the end of the test (default: SQLite in its
                               data directory). Synapse stays on SQLite.
    SWITCHBOARD_TEST_POSTGRES  the maintenance connection that creates and drops those databases
                               (default: postgresql://postgres@127.0.0.1:5432/postgres)
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from nio import AsyncClient, AsyncClientConfig, LoginResponse, RegisterResponse

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_NAME = "localhost"
DEFAULT_PASSWORD = "correct horse battery staple"

READY_TIMEOUT = 30.0  # seconds for the server to answer /versions
STOP_TIMEOUT = 10.0  # seconds for the server to exit after SIGTERM
LOG_TAIL_LINES = 60


def server_binary() -> Path:
    configured = os.environ.get("SWITCHBOARD_BIN")
    return Path(configured).resolve() if configured else REPO_ROOT / "target/debug/switchboard"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_id(localpart: str) -> str:
    return f"@{localpart}:{SERVER_NAME}"


def _yaml_str(value: str | Path) -> str:
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(str(value))


@dataclass(frozen=True)
class NamespaceRule:
    """One entry of a registration's users/aliases/rooms namespace."""

    regex: str
    exclusive: bool = True


@dataclass
class AppServiceRegistration:
    """An application service registration file (Synapse's format)."""

    id: str
    url: str | None
    sender_localpart: str
    users: list[NamespaceRule] = field(default_factory=list)
    aliases: list[NamespaceRule] = field(default_factory=list)
    rooms: list[NamespaceRule] = field(default_factory=list)
    as_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    hs_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    rate_limited: bool = False
    # Further top-level keys, as YAML lines (e.g. "receive_ephemeral: true\n").
    extra: str = ""

    def to_yaml(self) -> str:
        def rules(kind: str, entries: list[NamespaceRule]) -> str:
            if not entries:
                return f"  {kind}: []\n"
            lines = "".join(
                f"    - {{exclusive: {str(e.exclusive).lower()}, regex: {_yaml_str(e.regex)}}}\n"
                for e in entries
            )
            return f"  {kind}:\n{lines}"

        url = "null" if self.url is None else _yaml_str(self.url)
        return (
            f"id: {_yaml_str(self.id)}\n"
            f"url: {url}\n"
            f"as_token: {_yaml_str(self.as_token)}\n"
            f"hs_token: {_yaml_str(self.hs_token)}\n"
            f"sender_localpart: {_yaml_str(self.sender_localpart)}\n"
            f"rate_limited: {str(self.rate_limited).lower()}\n"
            "namespaces:\n"
            + rules("users", self.users)
            + rules("aliases", self.aliases)
            + rules("rooms", self.rooms)
            + self.extra
        )


def write_registrations(data_dir: Path, registrations: list[AppServiceRegistration]) -> list[Path]:
    """Writes one registration file per service into data_dir/appservices; returns their paths."""
    if not registrations:
        return []
    directory = data_dir / "appservices"
    directory.mkdir(exist_ok=True)
    paths = []
    for registration in registrations:
        path = directory / f"{registration.id}.yaml"
        path.write_text(registration.to_yaml())
        paths.append(path)
    return paths


def postgres_selected() -> bool:
    return os.environ.get("SWITCHBOARD_TEST_DATABASE") == "postgres"


POSTGRES_ADMIN_URL = os.environ.get(
    "SWITCHBOARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_databases_to_drop: list[PostgresDatabase] = []


class PostgresDatabase:
    """A fresh, empty PostgreSQL database for one homeserver, made as the Rust tests make theirs
    (crates/switchboard-store/src/testing.rs). The `drop_test_databases` fixture drops it at the end
    of the test that made it, so it outlives restarts of its homeserver within that test."""

    _count = itertools.count()

    def __init__(self) -> None:
        self.name = f"sbtest_{os.getpid()}_{next(self._count)}_{time.time_ns() % 1_000_000_000}"
        # CREATE/DROP DATABASE cannot run in a transaction.
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                f"CREATE DATABASE {self.name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
            )
            self.host, self.port, self.user = admin.info.host, admin.info.port, admin.info.user
        _databases_to_drop.append(self)

    def config_block(self) -> str:
        """The `database:` block of a homeserver.yaml for this database."""
        return (
            f"database: {{name: psycopg2, args: {{user: {_yaml_str(self.user)}, dbname: {self.name}, "
            f"host: {_yaml_str(self.host)}, port: {self.port}, cp_min: 1, cp_max: 10}}}}"
        )

    def drop(self) -> None:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


@pytest.fixture(autouse=True)
def drop_test_databases():
    """Drops the PostgreSQL databases made during a test. Autouse, so torn down after the fixtures
    that stop the homeservers, whether the test passed, failed or its server never started."""
    yield
    while _databases_to_drop:
        _databases_to_drop.pop().drop()


def write_config(
    data_dir: Path,
    port: int,
    app_service_config_files: list[Path] | tuple[Path, ...] = (),
    database: PostgresDatabase | None = None,
) -> Path:
    """Writes a Synapse-style homeserver.yaml (and a signing key) into data_dir: on `database`
    if given, else on SQLite in data_dir."""
    signing_key = data_dir / "signing.key"
    if not signing_key.exists():
        seed = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        signing_key.write_text(f"ed25519 a_test {seed}\n")
    app_service_files = ", ".join(_yaml_str(path) for path in app_service_config_files)
    database_block = (
        database.config_block()
        if database
        else f"database: {{name: sqlite3, args: {{database: {_yaml_str(data_dir / 'homeserver.db')}}}}}"
    )

    config = data_dir / "homeserver.yaml"
    config.write_text(
        f"""\
server_name: {SERVER_NAME}
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    resources: [{{names: [client]}}]
{database_block}
media_store_path: {_yaml_str(data_dir / "media")}
signing_key_path: {_yaml_str(signing_key)}
enable_registration: true
enable_registration_without_verification: true
registration_shared_secret: "{secrets.token_hex(16)}"
app_service_config_files: [{app_service_files}]
rc_message: {{per_second: 1000, burst_count: 1000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
  failed_attempts: {{per_second: 1000, burst_count: 1000}}
rc_joins: {{local: {{per_second: 1000, burst_count: 1000}}}}
rc_invites:
  per_room: {{per_second: 1000, burst_count: 1000}}
  per_user: {{per_second: 1000, burst_count: 1000}}
  per_issuer: {{per_second: 1000, burst_count: 1000}}
"""
    )
    return config


def terminate(proc: subprocess.Popen | None) -> bool:
    """SIGTERM a process and wait for it; SIGKILL it after STOP_TIMEOUT. False if it had to be killed."""
    if proc is None or proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


class Homeserver:
    """A Switchboard process serving the Client-Server API on 127.0.0.1:port, on SQLite in
    data_dir or, with SWITCHBOARD_TEST_DATABASE=postgres, on a PostgreSQL database of its own."""

    def __init__(
        self,
        binary: Path,
        data_dir: Path,
        port: int,
        app_services: list[AppServiceRegistration] | tuple[AppServiceRegistration, ...] = (),
        app_service_files: list[Path] | tuple[Path, ...] = (),
    ):
        self.binary = binary
        self.data_dir = data_dir
        self.port = port
        self.app_services = list(app_services)
        self.database = PostgresDatabase() if postgres_selected() else None
        self.config_path = write_config(
            data_dir,
            port,
            write_registrations(data_dir, self.app_services) + list(app_service_files),
            self.database,
        )
        self.log_path = data_dir / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self._proc is None, "server already running"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info,ruma_state_res=warn")
        env.setdefault("NO_COLOR", "1")
        with self.log_path.open("ab") as log:
            log.write(f"\n===== starting {self.binary} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [str(self.binary), "--config", str(self.config_path)],
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self._wait_ready()

    def stop(self) -> None:
        """SIGTERM the server and wait for it to exit (SIGKILL and fail if it hangs)."""
        proc, self._proc = self._proc, None
        if not terminate(proc):
            pytest.fail(f"server did not exit within {STOP_TIMEOUT}s of SIGTERM\n{self.log_tail()}")

    def restart(self) -> None:
        """Stops the server and starts it again on the same data directory and port."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def _wait_ready(self) -> None:
        versions = f"{self.url}/_matrix/client/versions"
        deadline = time.monotonic() + READY_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                pytest.fail(f"server exited with status {code} during startup\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(versions, timeout=2) as resp:
                    body = json.load(resp)
                if isinstance(body.get("versions"), list):
                    return
                last_error = f"unexpected /versions body: {body!r}"
            except (OSError, ValueError) as e:  # connection refused, HTTP error, bad JSON
                last_error = repr(e)
            time.sleep(0.1)
        self.stop()
        pytest.fail(
            f"server not ready after {READY_TIMEOUT}s (GET {versions}: {last_error})\n{self.log_tail()}"
        )


@pytest.fixture
def app_service_registrations() -> list[AppServiceRegistration]:
    """The application services `homeserver` registers; override in a module to add some."""
    return []


@pytest.fixture
def app_service_files() -> list[Path]:
    """Registration files (written elsewhere) the `homeserver` fixture lists as well."""
    return []


@pytest.fixture
def homeserver(
    tmp_path: Path,
    app_service_registrations: list[AppServiceRegistration],
    app_service_files: list[Path],
):
    binary = server_binary()
    if not os.access(binary, os.X_OK):
        pytest.fail(f"switchboard binary not found at {binary} (build it, or set SWITCHBOARD_BIN)")
    server = Homeserver(
        binary,
        tmp_path,
        free_port(),
        app_services=app_service_registrations,
        app_service_files=app_service_files,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        # Shown by pytest only when the test fails.
        print(server.log_tail())


def client_config() -> AsyncClientConfig:
    # Surface rate limits and dropped connections as failures instead of retrying.
    return AsyncClientConfig(max_limit_exceeded=0, max_timeouts=0, request_timeout=30)


async def register_user(
    homeserver_url: str, username: str, password: str = DEFAULT_PASSWORD
) -> AsyncClient:
    """Registers `username` (UIA with m.login.dummy) and returns the logged-in client."""
    client = AsyncClient(homeserver_url, config=client_config())
    resp = await client.register(username, password)
    if not isinstance(resp, RegisterResponse):
        await client.close()
        pytest.fail(f"registering {username!r} failed: {resp}")
    assert resp.user_id == user_id(username), f"register returned user_id {resp.user_id!r}"
    assert client.access_token, "register returned no access token"
    return client


class Clients:
    """Creates nio clients against one homeserver and closes them all at teardown."""

    def __init__(self, homeserver: Homeserver):
        self.homeserver = homeserver
        self._open: list[AsyncClient] = []

    def new(self, username: str = "") -> AsyncClient:
        """A fresh, logged-out client (login uses `username`)."""
        client = AsyncClient(self.homeserver.url, username, config=client_config())
        self._open.append(client)
        return client

    async def register(self, username: str, password: str = DEFAULT_PASSWORD) -> AsyncClient:
        client = await register_user(self.homeserver.url, username, password)
        self._open.append(client)
        return client

    async def login(self, username: str, password: str = DEFAULT_PASSWORD) -> AsyncClient:
        client = self.new(username)
        resp = await client.login(password)
        assert isinstance(resp, LoginResponse), f"login as {username!r} failed: {resp}"
        assert resp.user_id == user_id(username), f"login returned user_id {resp.user_id!r}"
        return client

    async def close_all(self) -> None:
        for client in self._open:
            await client.close()
        self._open.clear()


@pytest_asyncio.fixture
async def clients(homeserver: Homeserver):
    factory = Clients(homeserver)
    try:
        yield factory
    finally:
        await factory.close_all()


SYNAPSE_PYTHON = REPO_ROOT / "target/synapse-venv/bin/python"
# Synapse's switches for what encrypting services need: to-device messages (MSC2409/MSC4203) and
# key counts and device lists (MSC3202) in transactions. (MSC4190 needs only the registration.)
SYNAPSE_APPSERVICE_ENCRYPTION = (
    "experimental_features:\n"
    "  msc2409_to_device_messages_enabled: true\n"
    "  msc3202_transaction_extensions: true\n"
)
SYNAPSE_READY_TIMEOUT = 120.0  # seconds; the first start creates the whole schema


class Synapse:
    """Synapse, the reference homeserver, from target/synapse-venv (tests/interop/setup.sh synapse):
    SQLite, loopback, `server_name: localhost`, open registration, relaxed rate limits."""

    def __init__(
        self, data_dir: Path, port: int, app_service_files: list[Path], extra_config: str = ""
    ):
        if not SYNAPSE_PYTHON.exists():
            pytest.fail(
                f"Synapse is not installed at {SYNAPSE_PYTHON}: run `bash tests/interop/setup.sh synapse`"
            )
        self.data_dir = data_dir
        self.port = port
        self.log_path = data_dir / "synapse.log"
        files = ", ".join(_yaml_str(path) for path in app_service_files)
        self.config_path = data_dir / "synapse.yaml"
        self.config_path.write_text(
            f"""\
server_name: {SERVER_NAME}
pid_file: {_yaml_str(data_dir / "synapse.pid")}
listeners:
  - {{port: {port}, bind_addresses: ['127.0.0.1'], type: http, tls: false,
     resources: [{{names: [client], compress: false}}]}}
database: {{name: sqlite3, args: {{database: {_yaml_str(data_dir / "synapse.db")}}}}}
media_store_path: {_yaml_str(data_dir / "synapse-media")}
signing_key_path: {_yaml_str(data_dir / "synapse.signing.key")}
enable_registration: true
enable_registration_without_verification: true
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
macaroon_secret_key: {_yaml_str(secrets.token_hex(16))}
form_secret: {_yaml_str(secrets.token_hex(16))}
app_service_config_files: [{files}]
rc_message: {{per_second: 1000, burst_count: 1000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_joins: {{local: {{per_second: 1000, burst_count: 1000}}}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
  failed_attempts: {{per_second: 1000, burst_count: 1000}}
{extra_config}"""
        )
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [str(SYNAPSE_PYTHON), "-m", "synapse.app.homeserver", "-c", str(self.config_path)]
        subprocess.run(command + ["--generate-keys"], check=True, capture_output=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + SYNAPSE_READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"Synapse exited during startup\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"Synapse not ready after {SYNAPSE_READY_TIMEOUT}s\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no Synapse log)"
        return "\n".join(text.splitlines()[-lines:])
