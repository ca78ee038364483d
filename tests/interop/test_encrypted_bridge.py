"""Encrypted bridges: mautrix-python's crypto in appservice mode against matrix-nio users.

``encrypted_echo.py`` is a small service built the way the mautrix bridges encrypt: its bot's
device is made with MSC4190 (no login), and to-device messages, one-time-key counts and
device-list changes reach it only in transactions (MSC4203 under MSC2409's key, MSC3202). A nio
user with end-to-end encryption (vodozemac) talks to it in an encrypted DM: text round-trips
both ways; after a homeserver restart; after the service was down for 30 s while messages were
sent; after 60 claims of its one-time keys (the counts bring it back above its threshold); and a
new nio device is learnt by the service and decrypts the next reply.

The same test runs against Synapse 1.163 with its MSC2409/MSC3202/MSC4190 switches on, as the
baseline. One difference is expected and checked: Synapse sends key counts only with other
traffic, Switchboard as soon as a claim takes keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio
from nio import (
    AsyncClient,
    KeysUploadResponse,
    LoginResponse,
    MegolmEvent,
    RoomCreateResponse,
    RoomMessageText,
)

from conftest import (
    DEFAULT_PASSWORD,
    SERVER_NAME,
    SYNAPSE_APPSERVICE_ENCRYPTION,
    AppServiceRegistration,
    Homeserver,
    NamespaceRule,
    Synapse,
    free_port,
    server_binary,
    user_id,
)
from test_nio_e2ee import E2eeClients, e2ee_config, send_encrypted, sync_round

BOT = "_echo_bot"
BOT_ID = user_id(BOT)
MEGOLM = "m.megolm.v1.aes-sha2"
ECHO_SCRIPT = Path(__file__).with_name("encrypted_echo.py")
# mautrix keeps half of libolm's 100 one-time keys on the server, and uploads when below.
OTK_THRESHOLD = 50
OUTAGE_S = 30.0
ROUND_TRIP_S = 60.0


@pytest.fixture
def registration() -> AppServiceRegistration:
    return AppServiceRegistration(
        id="encrypted_echo",
        url=f"http://127.0.0.1:{free_port()}",
        sender_localpart=BOT,
        users=[NamespaceRule(rf"@_echo_.*:{SERVER_NAME}", exclusive=True)],
        # Synapse's switches for to-device messages, key counts and device management.
        extra=(
            "receive_ephemeral: true\n"
            "de.sorunome.msc2409.push_ephemeral: true\n"
            "org.matrix.msc3202: true\n"
            "io.element.msc4190: true\n"
        ),
    )


class Server:
    """Switchboard or Synapse, with the echo service registered."""

    def __init__(self, kind: str, tmp_path: Path, registration: AppServiceRegistration):
        self.kind = kind
        data_dir = tmp_path / kind
        data_dir.mkdir()
        if kind == "switchboard":
            self.impl = Homeserver(server_binary(), data_dir, free_port(), app_services=[registration])
        else:
            path = data_dir / "echo.yaml"
            path.write_text(registration.to_yaml())
            self.impl = Synapse(
                data_dir,
                free_port(),
                [path],
                extra_config=SYNAPSE_APPSERVICE_ENCRYPTION,
            )

    @property
    def url(self) -> str:
        return self.impl.url


@pytest.fixture(params=["switchboard", "synapse"])
def server(request, tmp_path: Path, registration: AppServiceRegistration):
    server = Server(request.param, tmp_path, registration)
    server.impl.start()
    try:
        yield server
    finally:
        server.impl.stop()
        print(server.impl.log_tail())


class EchoService:
    """encrypted_echo.py as a process of its own, so it can be stopped and started again."""

    def __init__(self, server: Server, registration: AppServiceRegistration, data_dir: Path):
        self.data_dir = data_dir
        self.log_path = data_dir / "echo.log"
        self.config_path = data_dir / "echo.json"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            json.dumps(
                {
                    "homeserver": server.url,
                    "domain": SERVER_NAME,
                    "id": registration.id,
                    "as_token": registration.as_token,
                    "hs_token": registration.hs_token,
                    "bot_localpart": BOT,
                    "port": int(registration.url.rsplit(":", 1)[1]),
                    "data_dir": str(data_dir / "state"),
                }
            )
        )
        self._proc: subprocess.Popen | None = None
        # Where this run's output starts in the log.
        self._offset = 0

    def start(self) -> None:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(ECHO_SCRIPT), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def lines(self, prefix: str, this_run: bool = True) -> list[str]:
        """Output lines starting with `prefix` (the prefix removed), of this run or of all."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._offset if this_run else 0)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]

    async def wait_for(self, prefix: str, timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.lines(prefix)
            if found:
                return found
            if self._proc is not None and self._proc.poll() is not None:
                pytest.fail(f"the echo service exited: {self.tail()}")
            await asyncio.sleep(0.1)
        pytest.fail(f"the echo service did not report {what} within {timeout}s: {self.tail()}")

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no echo log)"


@pytest_asyncio.fixture
async def echo(server: Server, registration: AppServiceRegistration, tmp_path: Path):
    service = EchoService(server, registration, tmp_path / "echo")
    service.start()
    try:
        await service.wait_for("READY", 60, "that it is ready")
        yield service
    finally:
        service.stop()
        print(service.tail())


@pytest_asyncio.fixture
async def nio(server: Server, tmp_path: Path):
    factory = E2eeClients(server, tmp_path / "nio-stores")
    try:
        yield factory
    finally:
        await factory.close_all()


async def echoes(client: AsyncClient, room_id: str, texts: list[str], timeout: float = ROUND_TRIP_S) -> None:
    """Syncs until the bot's decrypted `echo: <text>` arrived for each of `texts`."""
    wanted = {f"echo: {t}" for t in texts}
    undecryptable: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted and time.monotonic() < deadline:
        resp = await sync_round(client, timeout=2_000)
        room = resp.rooms.join.get(room_id)
        for event in room.timeline.events if room else []:
            if event.sender != BOT_ID:
                continue
            if isinstance(event, RoomMessageText):
                assert event.decrypted, f"the bot's {event.body!r} came in the clear"
                wanted.discard(event.body)
            elif isinstance(event, MegolmEvent):
                undecryptable.append(event.event_id)
    assert not wanted, (
        f"{client.user_id}/{client.device_id} did not get {sorted(wanted)} within {timeout}s "
        f"(undecryptable from the bot: {undecryptable})"
    )


async def round_trip(client: AsyncClient, room_id: str, text: str, echo: EchoService) -> None:
    await send_encrypted(client, room_id, text)
    await echoes(client, room_id, [text])
    assert text in echo.lines("DECRYPTED", this_run=False), f"the service did not decrypt {text!r}"


async def claim_bot_key(client: AsyncClient, device_id: str) -> dict:
    http = await client.send(
        "POST",
        "/_matrix/client/v3/keys/claim",
        json.dumps({"one_time_keys": {BOT_ID: {device_id: "signed_curve25519"}}}),
        headers={"Authorization": f"Bearer {client.access_token}"},
    )
    body = await http.json()
    assert http.status == 200, f"/keys/claim: {http.status} {body}"
    return body["one_time_keys"].get(BOT_ID, {}).get(device_id, {})


async def test_an_encrypted_dm_with_a_mautrix_service(
    server: Server, echo: EchoService, nio: E2eeClients, registration: AppServiceRegistration
):
    bot_device = echo.lines("READY")[0]
    alice = await nio.register("alice")
    resp = await alice.keys_upload()
    assert isinstance(resp, KeysUploadResponse), f"alice's key upload: {resp}"

    created = await alice.room_create(
        is_direct=True,
        invite=[BOT_ID],
        initial_state=[{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}],
    )
    assert isinstance(created, RoomCreateResponse), f"createRoom: {created}"
    room_id = created.room_id
    def bot_joined() -> bool:
        room = alice.rooms.get(room_id)
        return room is not None and BOT_ID in room.users and BOT_ID not in room.invited_users

    deadline = time.monotonic() + 30
    while not bot_joined():
        assert time.monotonic() < deadline, f"the bot never joined: {echo.tail()}"
        await sync_round(alice, timeout=1_000)
    # One more round runs the /keys/query for the bot's device.
    await sync_round(alice)

    # 1. Text both ways.
    await round_trip(alice, room_id, "hello, bridge", echo)

    # 2. After a homeserver restart.
    server.impl.restart()
    await round_trip(alice, room_id, "after a restart", echo)

    # 3. The service is down for 30 s while messages are sent; they decrypt once it is back.
    echo.stop()
    down_at = time.monotonic()
    missed = [f"while you were away {i}" for i in range(3)]
    for text in missed:
        await send_encrypted(alice, room_id, text)
    await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    echo.start()
    await echo.wait_for("READY", 60, "that it is back")
    await echoes(alice, room_id, missed)

    # 4. 60 claims of the bot's one-time keys (50 held: the last ones get the fallback key).
    claimer = await nio.register("claimer")
    before = len(echo.lines("OTK"))
    for _ in range(60):
        await claim_bot_key(claimer, bot_device)

    def counts_since() -> list[int]:
        return [int(c) for c in echo.lines("OTK")[before:]]

    if server.kind == "switchboard":
        # The counts come with no other traffic, while the claims go on.
        deadline = time.monotonic() + 10
        while not any(c < OTK_THRESHOLD for c in counts_since()):
            assert time.monotonic() < deadline, f"no low count reached the service: {counts_since()}"
            await asyncio.sleep(0.1)
    # (Synapse sends counts only with other traffic.) The service uploads keys when it sees a
    # low count; the next transactions show it back at its threshold.
    await round_trip(alice, room_id, "after the claims", echo)
    deadline = time.monotonic() + 20
    while not (
        any(c < OTK_THRESHOLD for c in counts_since()) and counts_since()[-1] >= OTK_THRESHOLD
    ):
        assert time.monotonic() < deadline, (
            f"after 60 claims the service saw counts {counts_since()}: they must drop, and "
            f"come back to {OTK_THRESHOLD} once it uploaded more"
        )
        await asyncio.sleep(0.2)
    key = await claim_bot_key(claimer, bot_device)
    assert key and not any(k.get("fallback") for k in key.values()), (
        f"a fresh one-time key after the refill, not the fallback: {key}"
    )

    # 5. A new device of alice: the service hears of it (device_lists.changed in a transaction),
    # starts a new Megolm session, and the new device decrypts the next reply.
    store = nio.store_root / "alice-2"
    store.mkdir(parents=True)
    second = AsyncClient(server.url, alice.user_id, store_path=str(store), config=e2ee_config())
    nio._open.append(second)
    login = await second.login(DEFAULT_PASSWORD, device_name="alice's second nio")
    assert isinstance(login, LoginResponse), f"alice's second login: {login}"
    assert second.device_id != alice.device_id
    resp = await second.keys_upload()
    assert isinstance(resp, KeysUploadResponse), f"the second device's key upload: {resp}"
    await sync_round(second)
    await sync_round(alice)
    # mautrix handles device-list changes in a background task: give it a moment before the
    # message whose reply must reach both devices.
    await asyncio.sleep(3)
    await send_encrypted(alice, room_id, "now on two devices")
    await echoes(second, room_id, ["now on two devices"])
    await echoes(alice, room_id, ["now on two devices"])
