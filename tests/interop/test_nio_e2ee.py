"""End-to-end encryption plumbing, exercised through matrix-nio's Olm/Megolm machine.

Two nio clients with encryption enabled (vodozemac, from the ``e2e`` extra)
upload device and one-time keys, find each other's devices with /keys/query,
claim one-time keys with /keys/claim, share Megolm room keys as Olm-encrypted
to-device messages (PUT /sendToDevice) picked up from /sync, and decrypt each
other's messages in a room created with m.room.encryption.

Cross-signing is not exercised: nio does not use it, and the senders pass
``ignore_unverified_devices=True`` instead of verifying devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_asyncio
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    KeysClaimResponse,
    KeysQueryResponse,
    KeysUploadResponse,
    MegolmEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomEncryptionEvent,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
    ToDeviceResponse,
)
from nio.api import Api
from nio.crypto import ENCRYPTION_ENABLED

from conftest import DEFAULT_PASSWORD, Homeserver, user_id

MEGOLM = "m.megolm.v1.aes-sha2"
LONG_POLL_MS = 5_000
MAX_ROUNDS = 6  # sync rounds to wait for an expected event


def e2ee_config() -> AsyncClientConfig:
    # As conftest.client_config(), plus the Olm machine and a persistent store.
    return AsyncClientConfig(
        max_limit_exceeded=0,
        max_timeouts=0,
        request_timeout=30,
        encryption_enabled=True,
        store_sync_tokens=True,
    )


class E2eeClients:
    """Registers encryption-enabled nio clients, each with its own store directory."""

    def __init__(self, homeserver: Homeserver, store_root: Path):
        self.homeserver = homeserver
        self.store_root = store_root
        self._open: list[AsyncClient] = []

    async def register(self, username: str) -> AsyncClient:
        store = self.store_root / username
        store.mkdir(parents=True)
        client = AsyncClient(self.homeserver.url, store_path=str(store), config=e2ee_config())
        self._open.append(client)
        resp = await client.register(username, DEFAULT_PASSWORD, device_name=f"{username}'s nio")
        assert isinstance(resp, RegisterResponse), f"registering {username!r} failed: {resp}"
        assert resp.user_id == user_id(username), f"register returned user_id {resp.user_id!r}"
        assert client.device_id, "register returned no device_id"
        assert ENCRYPTION_ENABLED, "matrix-nio is installed without its e2e extra (vodozemac)"
        assert client.olm is not None, f"{username}'s Olm machine was not set up after register"
        return client

    async def close_all(self) -> None:
        for client in self._open:
            await client.close()
        self._open.clear()


@pytest_asyncio.fixture
async def e2ee_clients(homeserver: Homeserver, tmp_path: Path):
    factory = E2eeClients(homeserver, tmp_path / "nio-stores")
    try:
        yield factory
    finally:
        await factory.close_all()


async def run_crypto_requests(client: AsyncClient) -> None:
    """What nio's sync_forever does between syncs: to-device sends and key upload/query/claim."""
    for resp in await client.send_to_device_messages():
        assert isinstance(resp, ToDeviceResponse), f"{client.user_id} /sendToDevice failed: {resp}"
    if client.should_upload_keys:
        resp = await client.keys_upload()
        assert isinstance(resp, KeysUploadResponse), f"{client.user_id} /keys/upload failed: {resp}"
    if client.should_query_keys:
        resp = await client.keys_query()
        assert isinstance(resp, KeysQueryResponse), f"{client.user_id} /keys/query failed: {resp}"
    if client.should_claim_keys:
        resp = await client.keys_claim(client.get_users_for_key_claiming())
        assert isinstance(resp, KeysClaimResponse), f"{client.user_id} /keys/claim failed: {resp}"


async def sync_round(client: AsyncClient, timeout: int = 0) -> SyncResponse:
    resp = await client.sync(timeout=timeout)
    assert isinstance(resp, SyncResponse), f"{client.user_id} /sync failed: {resp}"
    await run_crypto_requests(client)
    return resp


def describe_to_device(resp: SyncResponse) -> list[str]:
    return [f"{type(e).__name__}({e.source.get('type')} from {e.sender})" for e in resp.to_device_events]


async def receive_event(client: AsyncClient, room_id: str, event_id: str):
    """Syncs until `event_id` shows up in `room_id`'s timeline; returns it as nio handed it over.

    Room keys travel as to-device messages sent before the room event, so by
    the time the event is in a sync response nio must already hold its key.
    """
    to_device_seen: list[str] = []
    for _ in range(MAX_ROUNDS):
        resp = await sync_round(client, timeout=LONG_POLL_MS)
        to_device_seen += describe_to_device(resp)
        room = resp.rooms.join.get(room_id)
        for event in room.timeline.events if room else []:
            if event.event_id == event_id:
                return event, to_device_seen
    raise AssertionError(
        f"{client.user_id} never saw {event_id} in {room_id} after {MAX_ROUNDS} syncs; "
        f"to-device events received: {to_device_seen}"
    )


async def send_encrypted(sender: AsyncClient, room_id: str, body: str) -> str:
    assert sender.rooms[room_id].encrypted, f"{sender.user_id} does not see {room_id} as encrypted"
    resp = await sender.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": body}, ignore_unverified_devices=True
    )
    assert isinstance(resp, RoomSendResponse), f"{sender.user_id} sending {body!r} failed: {resp}"
    return resp.event_id


async def assert_decrypts(
    sender: AsyncClient, receiver: AsyncClient, room_id: str, body: str
) -> None:
    event_id = await send_encrypted(sender, room_id, body)
    # The event went out as m.room.encrypted, not in the clear. (Raw request:
    # nio's room_get_event would hand back the event already decrypted.)
    method, path = Api.room_get_event(sender.access_token, room_id, event_id)
    http = await sender.send(method, path)
    raw = await http.json()
    assert http.status == 200, f"GET /rooms/{room_id}/event/{event_id}: {http.status} {raw}"
    assert raw.get("type") == "m.room.encrypted", f"{event_id} is stored in the clear: {raw}"
    assert raw.get("content", {}).get("algorithm") == MEGOLM, f"{event_id} content: {raw.get('content')}"
    assert body not in json.dumps(raw), f"{event_id} leaks the plaintext: {raw}"

    event, to_device_seen = await receive_event(receiver, room_id, event_id)
    if isinstance(event, MegolmEvent):
        session = event.session_id
        has_key = receiver.olm.inbound_group_store.get(room_id, event.sender_key, session) is not None
        pytest.fail(
            f"{receiver.user_id} could not decrypt {event_id} from {sender.user_id} "
            f"(session {session}, key held now: {has_key}); "
            f"to-device events received while waiting: {to_device_seen}"
        )
    assert isinstance(event, RoomMessageText), f"{receiver.user_id} got {type(event).__name__}: {event}"
    assert event.decrypted, f"{event_id} was not marked as decrypted"
    assert event.body == body, f"decrypted body is {event.body!r}, sent {body!r}"
    assert event.sender == sender.user_id, f"decrypted sender is {event.sender!r}"
    assert event.sender_key == sender.olm.account.identity_keys["curve25519"], (
        f"decrypted with sender key {event.sender_key}, {sender.user_id}'s is "
        f"{sender.olm.account.identity_keys['curve25519']}"
    )


def assert_knows_device(client: AsyncClient, other: AsyncClient) -> None:
    devices = client.device_store.active_user_devices(other.user_id)
    by_id = {d.id: d for d in devices}
    assert other.device_id in by_id, (
        f"{client.user_id}'s /keys/query knows devices {sorted(by_id)} of {other.user_id}, "
        f"not {other.device_id}"
    )
    device = by_id[other.device_id]
    keys = other.olm.account.identity_keys
    assert (device.ed25519, device.curve25519) == (keys["ed25519"], keys["curve25519"]), (
        f"{client.user_id} has {other.user_id}'s device keys as "
        f"ed25519={device.ed25519} curve25519={device.curve25519}, uploaded {keys}"
    )


async def test_encrypted_room_messages_decrypt_both_ways(e2ee_clients: E2eeClients):
    alice = await e2ee_clients.register("alice")
    bob = await e2ee_clients.register("bob")

    # Device keys and one-time keys go up before anything else.
    for client in (alice, bob):
        assert client.should_upload_keys, f"{client.user_id}'s fresh device has nothing to upload"
        resp = await client.keys_upload()
        assert isinstance(resp, KeysUploadResponse), f"{client.user_id} /keys/upload failed: {resp}"
        assert resp.signed_curve25519_count > 0, (
            f"{client.user_id} /keys/upload reports {resp.signed_curve25519_count} one-time keys"
        )
        assert not client.should_upload_keys, f"{client.user_id} still wants to upload keys"

    created = await alice.room_create(
        name="Secrets",
        invite=[bob.user_id],
        initial_state=[
            {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}
        ],
    )
    assert isinstance(created, RoomCreateResponse), f"createRoom failed: {created}"
    room_id = created.room_id

    resp = await sync_round(bob)
    assert room_id in resp.rooms.invite, f"bob's sync lacks the invite to {room_id}"
    joined = await bob.join(room_id)
    assert isinstance(joined, JoinResponse), f"bob joining {room_id} failed: {joined}"

    for client in (alice, bob):
        resp = await sync_round(client)
        room = resp.rooms.join.get(room_id)
        assert room is not None, f"{client.user_id}'s sync lacks {room_id}"
        encryption = [e for e in room.state + room.timeline.events if isinstance(e, RoomEncryptionEvent)]
        assert encryption, f"{client.user_id}'s sync of {room_id} has no m.room.encryption event"
        assert client.rooms[room_id].encrypted, f"{client.user_id} does not see {room_id} as encrypted"
        assert set(client.rooms[room_id].users) == {alice.user_id, bob.user_id}, (
            f"{client.user_id} sees members {sorted(client.rooms[room_id].users)}"
        )

    # Sharing the room now makes each track the other's devices; one more
    # round runs the /keys/query that follows.
    for client in (alice, bob):
        await sync_round(client)
    assert_knows_device(alice, bob)
    assert_knows_device(bob, alice)

    # alice -> bob: alice claims one of bob's one-time keys, sends him the
    # Megolm key over Olm, then the encrypted message.
    await assert_decrypts(alice, bob, room_id, "the eagle has landed")
    # bob -> alice: the same in the other direction, with bob's own session.
    await assert_decrypts(bob, alice, room_id, "copy that")
