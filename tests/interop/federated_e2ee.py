"""End-to-end encryption across two federating homeservers, driven by matrix-nio (vodozemac).

Run by the Rust federation tests (crates/switchboard/tests/api/federation_edus.rs), which start
the two servers: ``federated_e2ee.py <client URL of A> <client URL of B> <store dir>``. Alice
registers on A, Bob on B. In an encrypted room and in an encrypted DM (both made by Alice) they
exchange Megolm messages both ways; then each gets a second device, which the other side learns
of (``device_lists.changed`` → ``/keys/query`` over federation) and which decrypts the next
message. Every key query, one-time-key claim and room-key to-device message crosses the two
servers. Exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    KeysClaimResponse,
    KeysQueryResponse,
    KeysUploadResponse,
    LoginResponse,
    MegolmEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
    ToDeviceResponse,
)
from nio.api import Api
from nio.crypto import ENCRYPTION_ENABLED

PASSWORD = "correct horse battery staple"
MEGOLM = "m.megolm.v1.aes-sha2"
LONG_POLL_MS = 2_000
ROUNDS = 20  # sync rounds to wait for something that crosses servers


class Failure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def config() -> AsyncClientConfig:
    return AsyncClientConfig(
        max_limit_exceeded=0, max_timeouts=0, request_timeout=30, encryption_enabled=True, store_sync_tokens=True
    )


class People:
    def __init__(self, store_root: Path):
        self.store_root = store_root
        self.clients: list[AsyncClient] = []

    def _client(self, url: str, name: str, user: str = "") -> AsyncClient:
        store = self.store_root / name
        store.mkdir(parents=True)
        client = AsyncClient(url, user, store_path=str(store), config=config())
        self.clients.append(client)
        return client

    async def register(self, url: str, name: str) -> AsyncClient:
        client = self._client(url, name)
        resp = await client.register(name, PASSWORD, device_name=f"{name}'s nio")
        check(isinstance(resp, RegisterResponse), f"registering {name} on {url}: {resp}")
        check(client.olm is not None, f"{name} has no Olm machine (nio without its e2e extra?)")
        await upload(client)
        return client

    async def second_device(self, url: str, first: AsyncClient, name: str) -> AsyncClient:
        client = self._client(url, name, first.user_id)
        resp = await client.login(PASSWORD, device_name=name)
        check(isinstance(resp, LoginResponse), f"{first.user_id} logging in again: {resp}")
        await upload(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def upload(client: AsyncClient) -> None:
    resp = await client.keys_upload()
    check(isinstance(resp, KeysUploadResponse), f"{client.user_id} /keys/upload: {resp}")


async def crypto_requests(client: AsyncClient) -> None:
    """What nio's sync_forever does between syncs."""
    for resp in await client.send_to_device_messages():
        check(isinstance(resp, ToDeviceResponse), f"{client.user_id} /sendToDevice: {resp}")
    if client.should_upload_keys:
        await upload(client)
    if client.should_query_keys:
        resp = await client.keys_query()
        check(isinstance(resp, KeysQueryResponse), f"{client.user_id} /keys/query: {resp}")
    if client.should_claim_keys:
        resp = await client.keys_claim(client.get_users_for_key_claiming())
        check(isinstance(resp, KeysClaimResponse), f"{client.user_id} /keys/claim: {resp}")


async def sync(client: AsyncClient, timeout: int = 0) -> SyncResponse:
    resp = await client.sync(timeout=timeout)
    check(isinstance(resp, SyncResponse), f"{client.user_id} /sync: {resp}")
    await crypto_requests(client)
    return resp


async def settle(*clients: AsyncClient) -> None:
    for client in clients:
        await sync(client)


def knows_device(client: AsyncClient, user_id: str, device_id: str) -> bool:
    return any(d.id == device_id for d in client.device_store.active_user_devices(user_id))


async def until_knows(client: AsyncClient, other: AsyncClient) -> None:
    for _ in range(ROUNDS):
        if knows_device(client, other.user_id, other.device_id):
            return
        await sync(client, LONG_POLL_MS)
    known = [d.id for d in client.device_store.active_user_devices(other.user_id)]
    raise Failure(f"{client.user_id} never learnt {other.user_id}'s device {other.device_id} (knows {known})")


async def shared_room(alice: AsyncClient, bob: AsyncClient, **create) -> str:
    created = await alice.room_create(
        invite=[bob.user_id],
        initial_state=[{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}],
        **create,
    )
    check(isinstance(created, RoomCreateResponse), f"createRoom: {created}")
    room_id = created.room_id
    for _ in range(ROUNDS):
        resp = await sync(bob, LONG_POLL_MS)
        if room_id in resp.rooms.invite:
            break
    else:
        raise Failure(f"{bob.user_id} never got the invite to {room_id}")
    joined = await bob.join(room_id)
    check(isinstance(joined, JoinResponse), f"{bob.user_id} joining {room_id}: {joined}")
    for _ in range(ROUNDS):
        await sync(alice, LONG_POLL_MS)
        if bob.user_id in alice.rooms[room_id].users:
            break
    else:
        raise Failure(f"{alice.user_id} never saw {bob.user_id} join {room_id}")
    for _ in range(ROUNDS):
        await sync(bob, LONG_POLL_MS)
        if room_id in bob.rooms and alice.user_id in bob.rooms[room_id].users:
            break
    else:
        raise Failure(f"{bob.user_id}'s sync never showed {room_id} joined")
    for client in (alice, bob):
        check(client.rooms[room_id].encrypted, f"{client.user_id} does not see {room_id} as encrypted")
    return room_id


async def decrypts(sender: AsyncClient, receivers: list[AsyncClient], room_id: str, body: str) -> None:
    await sync(sender)
    resp = await sender.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": body}, ignore_unverified_devices=True
    )
    check(isinstance(resp, RoomSendResponse), f"{sender.user_id} sending {body!r}: {resp}")
    event_id = resp.event_id
    method, path = Api.room_get_event(sender.access_token, room_id, event_id)
    raw = await (await sender.send(method, path)).json()
    check(raw.get("type") == "m.room.encrypted", f"{event_id} is stored in the clear: {raw}")
    check(body not in json.dumps(raw), f"{event_id} leaks its plaintext")
    for receiver in receivers:
        event = None
        for _ in range(ROUNDS):
            resp = await sync(receiver, LONG_POLL_MS)
            room = resp.rooms.join.get(room_id)
            event = next((e for e in (room.timeline.events if room else []) if e.event_id == event_id), None)
            if event is not None:
                break
        who = f"{receiver.user_id} ({receiver.device_id})"
        check(event is not None, f"{who} never received {body!r} ({event_id})")
        check(not isinstance(event, MegolmEvent), f"{who} could not decrypt {body!r} from {sender.user_id}")
        check(isinstance(event, RoomMessageText) and event.body == body, f"{who} got {event!r} for {body!r}")
        check(
            event.sender_key == sender.olm.account.identity_keys["curve25519"],
            f"{who} decrypted {body!r} with the wrong sender key",
        )
    print(f"ok: {sender.user_id} -> {[r.device_id for r in receivers]}: {body!r}", flush=True)


async def main(url_a: str, url_b: str, store_root: Path) -> None:
    check(ENCRYPTION_ENABLED, "matrix-nio is installed without its e2e extra")
    people = People(store_root)
    try:
        alice = await people.register(url_a, "alice")
        bob = await people.register(url_b, "bob")
        room = await shared_room(alice, bob, name="Secrets")
        dm = await shared_room(alice, bob, is_direct=True)
        await until_knows(alice, bob)
        await until_knows(bob, alice)
        for room_id, what in ((room, "room"), (dm, "DM")):
            await decrypts(alice, [bob], room_id, f"the eagle has landed ({what})")
            await decrypts(bob, [alice], room_id, f"copy that ({what})")

        # A new device on each side: seen by the other, able to read the next message.
        bob2 = await people.second_device(url_b, bob, "bob2")
        await settle(bob2)
        await until_knows(alice, bob2)
        await decrypts(alice, [bob, bob2], room, "for both of Bob's devices")
        await decrypts(alice, [bob2], dm, "for Bob's new device, privately")
        alice2 = await people.second_device(url_a, alice, "alice2")
        await settle(alice2)
        await until_knows(bob, alice2)
        await decrypts(bob, [alice, alice2], room, "for both of Alice's devices")
        await until_knows(bob2, alice2)
        await decrypts(bob2, [alice2], dm, "from one new device to the other")
    finally:
        await people.close()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
    except Failure as failure:
        print(f"FAILED: {failure}", file=sys.stderr, flush=True)
        sys.exit(1)
