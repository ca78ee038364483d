"""The logging service (crates/switchboard-logger, built on Switchboard's Rust SDK) end to end:
a matrix-nio user joins `#logged_…` aliases that do not exist yet, the service creates the rooms
when the homeserver asks, and every message there becomes one JSON line in its log.

The same scenario runs against Synapse, to show the SDK is not tied to Switchboard.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from nio import AsyncClient, JoinResponse, RoomCreateResponse, RoomSendResponse

from conftest import (
    REPO_ROOT,
    SERVER_NAME,
    SYNAPSE_APPSERVICE_ENCRYPTION,
    Homeserver,
    Synapse,
    free_port,
    register_user,
    server_binary,
    user_id,
)

from federated_e2ee import People, sync

LOGGER_READY_TIMEOUT = 30.0
LOG_TIMEOUT = 10.0


def logger_binary() -> Path:
    configured = os.environ.get("SWITCHBOARD_LOGGER_BIN")
    return Path(configured) if configured else REPO_ROOT / "target/debug/switchboard-logger"


class Logger:
    """The switchboard-logger process, with its registration, log and transaction record."""

    def __init__(self, data_dir: Path, encrypted: bool = False):
        self.encrypted = encrypted
        self.port = free_port()
        self.data_dir = data_dir
        self.registration = data_dir / "logger.yaml"
        self.log = data_dir / "logged.jsonl"
        self.stderr = data_dir / "logger.stderr"
        self.homeserver_url = ""
        self._proc: subprocess.Popen | None = None
        out = subprocess.run(
            [
                str(logger_binary()),
                "generate-registration",
                "--url",
                self.url,
                "--server-name",
                SERVER_NAME,
                "--output",
                str(self.registration),
            ]
            + (["--encryption"] if encrypted else []),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, f"generate-registration failed: {out.stderr}"
        text = self.registration.read_text()
        match = re.search(r"^hs_token: ['\"]?([A-Za-z0-9]+)", text, re.M)
        assert match, f"no hs_token in the generated registration:\n{text}"
        self.hs_token = match.group(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, homeserver_url: str) -> None:
        self.homeserver_url = homeserver_url
        self.stderr.write_text("")
        self._proc = subprocess.Popen(
            [
                str(logger_binary()),
                "--registration",
                str(self.registration),
                "--homeserver",
                homeserver_url,
                "--server-name",
                SERVER_NAME,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-file",
                str(self.log),
                "--txn-file",
                str(self.data_dir / "logger-txns"),
            ]
            + (
                ["--encryption-dir", str(self.data_dir / "logger-crypto"), "--encrypt-new-rooms"]
                if self.encrypted
                else []
            ),
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("ab"),
            env={**os.environ, "NO_COLOR": "1"},
        )
        deadline = time.monotonic() + LOGGER_READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"switchboard-logger exited:\n{self.stderr.read_text()}")
            if "application service ready" in self.stderr.read_text():
                return
            time.sleep(0.1)
        pytest.fail(f"switchboard-logger not ready:\n{self.stderr.read_text()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)

    def lines(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    async def wait_for(self, body: str) -> dict:
        deadline = time.monotonic() + LOG_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.lines():
                if line["content"].get("body") == body:
                    return line
            await asyncio.sleep(0.05)
        pytest.fail(f"{body!r} never logged; log: {self.lines()}\n{self.stderr.read_text()}")


@pytest.fixture(params=["switchboard", "synapse"])
def system(request, tmp_path: Path):
    # Also "encrypted" and "encrypted-synapse": the service logs encrypted rooms.
    """A homeserver (Switchboard or Synapse) with the logging service registered and running."""
    if not os.access(logger_binary(), os.X_OK):
        pytest.fail(f"switchboard-logger not found at {logger_binary()} (cargo build)")
    encrypted = request.param.startswith("encrypted")
    logger = Logger(tmp_path, encrypted)
    if request.param in ("switchboard", "encrypted"):
        server = Homeserver(server_binary(), tmp_path, free_port(), app_service_files=[logger.registration])
    else:
        extra = SYNAPSE_APPSERVICE_ENCRYPTION if encrypted else ""
        server = Synapse(tmp_path, free_port(), [logger.registration], extra_config=extra)
    server.start()
    try:
        logger.start(server.url)
        yield server, logger
    finally:
        logger.stop()
        server.stop()
        print(server.log_tail())


async def join_and_say(client: AsyncClient, alias: str, body: str) -> str:
    joined = await client.join(alias)
    assert isinstance(joined, JoinResponse), f"joining {alias}: {joined}"
    sent = await client.room_send(joined.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    assert isinstance(sent, RoomSendResponse), f"sending to {alias}: {sent}"
    return joined.room_id


async def test_joining_a_logged_alias_creates_the_room_and_logs_its_messages(system):
    server, logger = system
    alice = await register_user(server.url, "alice")
    try:
        first = await join_and_say(alice, f"#logged_test:{SERVER_NAME}", "hello, logged world")
        line = await logger.wait_for("hello, logged world")
        assert line["room_id"] == first
        assert line["sender"] == user_id("alice")
        assert line["type"] == "m.room.message"

        second = await join_and_say(alice, f"#logged_test2:{SERVER_NAME}", "a second room")
        assert second != first
        assert (await logger.wait_for("a second room"))["room_id"] == second

        # A room without a logged alias is none of the service's business.
        private = await alice.room_create(name="not logged")
        assert isinstance(private, RoomCreateResponse), private
        secret = await alice.room_send(private.room_id, "m.room.message", {"msgtype": "m.text", "body": "secret"})
        assert isinstance(secret, RoomSendResponse), f"the message the service must not see exists: {secret}"
        await alice.room_send(second, "m.room.message", {"msgtype": "m.text", "body": "barrier"})
        await logger.wait_for("barrier")
        assert all(line["content"].get("body") != "secret" for line in logger.lines())
        # Each message once.
        bodies = [line["content"].get("body") for line in logger.lines()]
        assert bodies.count("hello, logged world") == 1, bodies
    finally:
        await alice.close()


def put_transaction(logger: Logger, txn_id: str, event: dict) -> int:
    request = urllib.request.Request(
        f"{logger.url}/_matrix/app/v1/transactions/{txn_id}",
        data=json.dumps({"events": [event]}).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {logger.hs_token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


@pytest.mark.parametrize("system", ["switchboard"], indirect=True)
async def test_a_redelivered_transaction_is_logged_once_even_after_a_restart(system):
    server, logger = system
    event = {
        "type": "m.room.message",
        "room_id": f"!redelivered:{SERVER_NAME}",
        "event_id": "$redelivered",
        "sender": user_id("bob"),
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": "only once"},
    }
    assert put_transaction(logger, "again-1", event) == 200
    assert put_transaction(logger, "again-1", event) == 200
    logger.stop()
    logger.start(server.url)
    assert put_transaction(logger, "again-1", event) == 200
    await logger.wait_for("only once")
    assert [line["event_id"] for line in logger.lines()].count("$redelivered") == 1

    # The service checks who is pushing: a wrong hs_token is refused.
    logger.hs_token = "wrong"
    with pytest.raises(urllib.error.HTTPError) as refused:
        put_transaction(logger, "again-2", event)
    assert refused.value.code == 403
    assert json.load(refused.value)["errcode"] == "M_FORBIDDEN"


@pytest.mark.parametrize("system", ["encrypted", "encrypted-synapse"], indirect=True)
async def test_encrypted_logged_rooms_are_logged_decrypted(system, tmp_path: Path):
    """With `--encryption-dir` (and `--encrypt-new-rooms`) the service creates logged rooms
    encrypted, and its bot's device decrypts what a matrix-nio user with end-to-end encryption
    says there: the log has the plaintext, the homeserver only the ciphertext."""
    server, logger = system
    people = People(tmp_path / "nio")
    try:
        alice = await people.register(server.url, "alice")
        joined = await alice.join(f"#logged_secret:{SERVER_NAME}")
        assert isinstance(joined, JoinResponse), joined
        room_id = joined.room_id
        await sync(alice)
        await sync(alice)  # the /keys/query for the bot's device
        assert alice.rooms[room_id].encrypted, "the service created the logged room encrypted"
        sent = await alice.room_send(
            room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": "for the record"},
            ignore_unverified_devices=True,
        )
        assert isinstance(sent, RoomSendResponse), sent
        line = await logger.wait_for("for the record")
        assert (line["type"], line["event_id"], line["sender"]) == (
            "m.room.message",
            sent.event_id,
            user_id("alice"),
        )
        request = urllib.request.Request(
            f"{server.url}/_matrix/client/v3/rooms/{room_id}/event/{sent.event_id}",
            headers={"Authorization": f"Bearer {alice.access_token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            stored = json.load(response)
        assert stored["type"] == "m.room.encrypted", f"the server holds ciphertext only: {stored}"
    finally:
        await people.close()
