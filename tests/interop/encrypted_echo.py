"""A small encrypted echo service on mautrix-python, the way mautrix bridges do encryption.

Appservice mode with MSC4190: the bot's device is created with ``PUT /devices/{id}`` under
the service's ``as_token`` (no login), every request is masqueraded as that device, and the
service reads its to-device messages, one-time-key counts and device-list changes from its
transactions (MSC4203/MSC2409, MSC3202) — it never calls ``/sync``. Its Olm account and Megolm
sessions live in SQLite (mautrix's ``PgCryptoStore`` on aiosqlite), so a restart keeps them.

The bot joins the rooms it is invited to, decrypts each ``m.room.encrypted`` message and
answers ``echo: <text>``, encrypted. It prints one line per thing a test waits for::

    READY <device_id>
    DECRYPTED <text>
    ECHOED <text>
    OTK <signed_curve25519 count the homeserver reported>

Run: ``python encrypted_echo.py CONFIG.json`` (keys: homeserver, domain, id, as_token,
hs_token, bot_localpart, port, data_dir). SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from mautrix.appservice import AppService
from mautrix.appservice.state_store import FileASStateStore
from mautrix.client import Client
from mautrix.crypto import OlmMachine, PgCryptoStore, StateStore
from mautrix.errors import EncryptionError, MNotFound, SessionNotFound
from mautrix.types import (
    DeviceID,
    DeviceOTKCount,
    EncryptedEvent,
    Event,
    EventType,
    Membership,
    MessageType,
    RoomEncryptionStateEventContent,
    RoomID,
    StateEvent,
    TextMessageEventContent,
    UserID,
)
from mautrix.util.async_db import Database

PICKLE_KEY = "switchboard-interop-echo"
SESSION_WAIT_S = 20  # how long a message waits for its room key to arrive


def say(line: str) -> None:
    print(line, flush=True)


class HomeserverState(StateStore):
    """The crypto machine's view of rooms, asked of the homeserver (as the bot) each time:
    a test service has few rooms, and nothing can go stale across restarts."""

    def __init__(self, service: AppService):
        self.service = service

    async def is_encrypted(self, room_id: RoomID) -> bool:
        return await self.get_encryption_info(room_id) is not None

    async def get_encryption_info(self, room_id: RoomID) -> RoomEncryptionStateEventContent | None:
        try:
            return await self.service.intent.get_state_event(room_id, EventType.ROOM_ENCRYPTION)
        except MNotFound:
            return None

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        shared = []
        for room_id in await self.service.intent.get_joined_rooms():
            members = await self.service.intent.get_joined_members(room_id)
            if user_id in members and await self.is_encrypted(room_id):
                shared.append(room_id)
        return shared


class EchoService:
    def __init__(self, config: dict):
        data_dir = Path(config["data_dir"])
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = int(config["port"])
        self.service = AppService(
            server=config["homeserver"],
            domain=config["domain"],
            id=config["id"],
            as_token=config["as_token"],
            hs_token=config["hs_token"],
            bot_localpart=config["bot_localpart"],
            ephemeral_events=True,
            encryption_events=True,
            log=logging.getLogger("echo.as"),
            state_store=FileASStateStore(data_dir / "as-state.json", binary=False),
        )
        self.db = Database.create(
            f"sqlite:///{data_dir / 'crypto.db'}",
            upgrade_table=PgCryptoStore.upgrade_table,
            log=logging.getLogger("echo.db"),
        )
        self.store = PgCryptoStore("", PICKLE_KEY, self.db)
        self.client = Client(
            base_url=config["homeserver"],
            mxid=self.service.bot_mxid,
            sync_store=self.store,
            log=logging.getLogger("echo.client"),
        )
        self.crypto = OlmMachine(self.client, self.store, HomeserverState(self.service))
        self.service.otk_handler = self.on_otk_counts
        self.service.device_list_handler = self.crypto.handle_as_device_lists
        self.service.to_device_handler = self.crypto.handle_as_to_device_event
        self.service.matrix_event_handler(self.on_event)

    async def start(self) -> None:
        # The crypto machine is ready before the first transaction can arrive: a room key in a
        # transaction handled without it would be lost (the service acknowledges regardless).
        await self.db.start()
        await self.store.open()
        device_id = await self.store.get_device_id()
        self.client.api.token = self.service.as_token
        await self.client.create_device_msc4190(
            device_id=device_id or DeviceID(""), initial_display_name="encrypted echo"
        )
        await self.crypto.load()
        if not device_id:
            await self.store.put_device_id(self.client.device_id)
        if not device_id or not self.crypto.account.shared:
            await self.crypto.share_keys()
        await self.service.start(host="127.0.0.1", port=self.port)
        self.service.ready = True
        # Tell the homeserver the service is (back) up, so it retries transactions now.
        await self.service.ping_self()
        say(f"READY {self.client.device_id}")

    async def stop(self) -> None:
        await self.service.stop()
        await self.db.stop()

    async def on_otk_counts(self, counts: dict[UserID, dict[DeviceID, DeviceOTKCount]]) -> None:
        mine = counts.get(self.client.mxid, {}).get(self.client.device_id)
        if mine is not None:
            say(f"OTK {mine.signed_curve25519}")
        await self.crypto.handle_as_otk_counts(counts)

    async def on_event(self, event: Event) -> None:
        if (
            isinstance(event, StateEvent)
            and event.type == EventType.ROOM_MEMBER
            and event.state_key == self.service.bot_mxid
            and event.content.membership == Membership.INVITE
        ):
            await self.service.intent.join_room(event.room_id)
        elif isinstance(event, EncryptedEvent) and event.sender != self.service.bot_mxid:
            await self.echo(event)

    async def echo(self, event: EncryptedEvent) -> None:
        try:
            decrypted = await self.crypto.decrypt_megolm_event(event)
        except SessionNotFound as e:
            if not await self.crypto.wait_for_session(
                event.room_id, e.session_id, timeout=SESSION_WAIT_S
            ):
                say(f"UNDECRYPTABLE {event.event_id}")
                return
            decrypted = await self.crypto.decrypt_megolm_event(event)
        text = decrypted.content.body
        say(f"DECRYPTED {text}")
        reply = TextMessageEventContent(msgtype=MessageType.TEXT, body=f"echo: {text}")
        await self.send_encrypted(event.room_id, reply)
        say(f"ECHOED {text}")

    async def send_encrypted(self, room_id: RoomID, content: TextMessageEventContent) -> None:
        try:
            encrypted = await self.crypto.encrypt_megolm_event(room_id, EventType.ROOM_MESSAGE, content)
        except EncryptionError:
            # No outbound session yet (or it was rotated for a new device): share a new one with
            # every member's devices, then encrypt.
            members = list(await self.service.intent.get_joined_members(room_id))
            await self.crypto.share_group_session(room_id, members)
            encrypted = await self.crypto.encrypt_megolm_event(room_id, EventType.ROOM_MESSAGE, content)
        await self.service.intent.send_message_event(room_id, EventType.ROOM_ENCRYPTED, encrypted)


async def main(config_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = json.loads(Path(config_path).read_text())
    echo = EchoService(config)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await echo.start()
    await stopped.wait()
    await echo.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
