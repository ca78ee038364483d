"""Everyday client features, exercised through matrix-nio and observed by a second user.

Profiles (display name and avatar, seen in the room's member list), typing
notifications and read receipts (ephemeral events in /sync), the media
repository (upload, download, thumbnail) and to-device messages.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

from nio import (
    AsyncClient,
    JoinResponse,
    MemoryDownloadResponse,
    ProfileGetAvatarResponse,
    ProfileGetDisplayNameResponse,
    ProfileGetResponse,
    ProfileSetAvatarResponse,
    ProfileSetDisplayNameResponse,
    ReceiptEvent,
    RoomCreateResponse,
    RoomMemberEvent,
    RoomPreset,
    RoomReadMarkersResponse,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
    ThumbnailResponse,
    ToDeviceMessage,
    ToDeviceResponse,
    TypingNoticeEvent,
    UnknownToDeviceEvent,
    UpdateReceiptMarkerResponse,
    UploadResponse,
)
from nio.api import ReceiptType, ResizingMethod

from conftest import SERVER_NAME, Clients

LONG_POLL_MS = 3_000
MAX_ROUNDS = 5  # sync rounds to wait for an expected event

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def make_png(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG with a colour gradient, built with zlib/struct only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 128)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


async def sync(client: AsyncClient, **kwargs) -> SyncResponse:
    resp = await client.sync(**kwargs)
    assert isinstance(resp, SyncResponse), f"{client.user_id} /sync failed: {resp}"
    return resp


async def shared_room(alice: AsyncClient, bob: AsyncClient) -> str:
    """Alice creates a public room, bob joins, and both do an initial sync."""
    created = await alice.room_create(preset=RoomPreset.public_chat, name="Features")
    assert isinstance(created, RoomCreateResponse), f"createRoom failed: {created}"
    joined = await bob.join(created.room_id)
    assert isinstance(joined, JoinResponse), f"bob joining {created.room_id} failed: {joined}"
    for client in (alice, bob):
        resp = await sync(client, timeout=0, full_state=True)
        assert created.room_id in resp.rooms.join, f"{client.user_id}'s initial sync lacks the room"
    return created.room_id


async def sync_until(client: AsyncClient, found, what: str):
    """Long-polls /sync until `found(resp)` is truthy; returns that value."""
    for _ in range(MAX_ROUNDS):
        resp = await sync(client, timeout=LONG_POLL_MS)
        result = found(resp)
        if result:
            return result
    raise AssertionError(f"{client.user_id} never saw {what} in {MAX_ROUNDS} sync rounds")


def ephemeral(resp: SyncResponse, room_id: str) -> list:
    room = resp.rooms.join.get(room_id)
    return room.ephemeral if room is not None else []


async def test_profile_changes_seen_by_other_member(clients: Clients):
    alice = await clients.register("alice")
    bob = await clients.register("bob")
    room_id = await shared_room(alice, bob)

    set_name = await alice.set_displayname("Alice Liddell")
    assert isinstance(set_name, ProfileSetDisplayNameResponse), f"set_displayname failed: {set_name}"
    got_name = await bob.get_displayname(alice.user_id)
    assert isinstance(got_name, ProfileGetDisplayNameResponse), f"get_displayname failed: {got_name}"
    assert got_name.displayname == "Alice Liddell", f"displayname is {got_name.displayname!r}"

    avatar = f"mxc://{SERVER_NAME}/aliceavatar"
    set_avatar = await alice.set_avatar(avatar)
    assert isinstance(set_avatar, ProfileSetAvatarResponse), f"set_avatar failed: {set_avatar}"
    got_avatar = await bob.get_avatar(alice.user_id)
    assert isinstance(got_avatar, ProfileGetAvatarResponse), f"get_avatar failed: {got_avatar}"
    assert got_avatar.avatar_url == avatar, f"avatar_url is {got_avatar.avatar_url!r}"

    profile = await bob.get_profile(alice.user_id)
    assert isinstance(profile, ProfileGetResponse), f"get_profile failed: {profile}"
    assert (profile.displayname, profile.avatar_url) == ("Alice Liddell", avatar), (
        f"profile is {profile.displayname!r}, {profile.avatar_url!r}"
    )

    # The profile change is propagated into the room as a new m.room.member event.
    def member_update(resp: SyncResponse):
        room = resp.rooms.join.get(room_id)
        if room is None:
            return None
        events = [
            e
            for e in room.timeline.events + room.state
            if isinstance(e, RoomMemberEvent)
            and e.state_key == alice.user_id
            and e.content.get("displayname") == "Alice Liddell"
            and e.content.get("avatar_url") == avatar
        ]
        return events

    (event, *_) = await sync_until(bob, member_update, "alice's updated m.room.member event")
    assert event.membership == "join", f"alice's updated member event has membership {event.membership!r}"
    nio_room = bob.rooms[room_id]
    assert nio_room.user_name(alice.user_id) == "Alice Liddell", (
        f"bob's nio room shows alice as {nio_room.user_name(alice.user_id)!r}"
    )
    assert nio_room.avatar_url(alice.user_id) == avatar, (
        f"bob's nio room shows alice's avatar as {nio_room.avatar_url(alice.user_id)!r}"
    )


async def test_typing_starts_and_stops_and_read_receipts_reach_the_sender(clients: Clients):
    alice = await clients.register("alice")
    bob = await clients.register("bob")
    room_id = await shared_room(alice, bob)

    typing = await alice.room_typing(room_id, True, timeout=20_000)
    assert isinstance(typing, RoomTypingResponse), f"room_typing failed: {typing}"

    def alice_typing(resp: SyncResponse):
        return [
            e for e in ephemeral(resp, room_id) if isinstance(e, TypingNoticeEvent) and alice.user_id in e.users
        ]

    await sync_until(bob, alice_typing, "alice typing")
    assert alice.user_id in bob.rooms[room_id].typing_users, (
        f"bob's nio room has typing users {bob.rooms[room_id].typing_users}"
    )

    stopped = await alice.room_typing(room_id, False)
    assert isinstance(stopped, RoomTypingResponse), f"room_typing(False) failed: {stopped}"

    def typing_cleared(resp: SyncResponse):
        return [
            e
            for e in ephemeral(resp, room_id)
            if isinstance(e, TypingNoticeEvent) and alice.user_id not in e.users
        ]

    await sync_until(bob, typing_cleared, "alice stop typing")
    assert alice.user_id not in bob.rooms[room_id].typing_users

    sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "read me"})
    assert isinstance(sent, RoomSendResponse), f"room_send failed: {sent}"
    await sync(alice, timeout=0)  # move alice's since token past her own message

    markers = await bob.room_read_markers(room_id, fully_read_event=sent.event_id, read_event=sent.event_id)
    assert isinstance(markers, RoomReadMarkersResponse), f"room_read_markers failed: {markers}"

    def bob_receipt(resp: SyncResponse, event_id: str):
        return [
            r
            for e in ephemeral(resp, room_id)
            if isinstance(e, ReceiptEvent)
            for r in e.receipts
            if r.user_id == bob.user_id and r.event_id == event_id and r.receipt_type == "m.read"
        ]

    (receipt, *_) = await sync_until(alice, lambda r: bob_receipt(r, sent.event_id), "bob's read receipt")
    assert receipt.timestamp > 0, f"receipt timestamp is {receipt.timestamp!r}"

    # The m.fully_read marker is private: it lands in bob's room account data.
    def fully_read(resp: SyncResponse):
        room = resp.rooms.join.get(room_id)
        if room is None:
            return None
        return [
            e
            for e in room.account_data
            if getattr(e, "event_id", None) == sent.event_id and type(e).__name__ == "FullyReadEvent"
        ]

    await sync_until(bob, fully_read, "bob's m.fully_read account data")

    # A second message, acknowledged with a plain /receipt.
    second = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "and me"})
    assert isinstance(second, RoomSendResponse), f"room_send failed: {second}"
    await sync(alice, timeout=0)
    receipt_resp = await bob.update_receipt_marker(room_id, second.event_id, ReceiptType.read)
    assert isinstance(receipt_resp, UpdateReceiptMarkerResponse), f"update_receipt_marker failed: {receipt_resp}"
    await sync_until(alice, lambda r: bob_receipt(r, second.event_id), "bob's second read receipt")


async def test_media_downloads_byte_for_byte_and_thumbnails_are_images(clients: Clients):
    alice = await clients.register("alice")
    bob = await clients.register("bob")

    payload = bytes(range(256)) * 40 + b"switchboard"
    uploaded, keys = await alice.upload(
        io.BytesIO(payload),
        content_type="application/octet-stream",
        filename="blob.bin",
        filesize=len(payload),
    )
    assert isinstance(uploaded, UploadResponse), f"upload failed: {uploaded}"
    assert keys is None
    assert uploaded.content_uri.startswith(f"mxc://{SERVER_NAME}/"), f"content_uri {uploaded.content_uri!r}"

    downloaded = await bob.download(uploaded.content_uri)
    assert isinstance(downloaded, MemoryDownloadResponse), f"download failed: {downloaded}"
    assert downloaded.body == payload, f"downloaded {len(downloaded.body)} bytes differ from the upload"
    assert downloaded.content_type.startswith("application/octet-stream"), (
        f"download content type {downloaded.content_type!r}"
    )
    assert downloaded.filename == "blob.bin", f"download filename {downloaded.filename!r}"

    png = make_png(64, 48)
    image, _ = await alice.upload(
        io.BytesIO(png), content_type="image/png", filename="gradient.png", filesize=len(png)
    )
    assert isinstance(image, UploadResponse), f"PNG upload failed: {image}"

    image_back = await bob.download(image.content_uri)
    assert isinstance(image_back, MemoryDownloadResponse), f"PNG download failed: {image_back}"
    assert image_back.body == png, "downloaded PNG differs from the upload"
    assert image_back.content_type.startswith("image/png"), f"PNG content type {image_back.content_type!r}"

    media_id = image.content_uri.rsplit("/", 1)[1]
    for method in (ResizingMethod.scale, ResizingMethod.crop):
        thumb = await bob.thumbnail(SERVER_NAME, media_id, 32, 32, method=method)
        assert isinstance(thumb, ThumbnailResponse), f"thumbnail ({method.value}) failed: {thumb}"
        assert thumb.body.startswith(PNG_MAGIC) or thumb.body.startswith(JPEG_MAGIC), (
            f"thumbnail ({method.value}) is not a PNG/JPEG: {thumb.body[:16]!r} ({thumb.content_type})"
        )
        assert thumb.content_type.split(";")[0] in ("image/png", "image/jpeg"), (
            f"thumbnail ({method.value}) content type {thumb.content_type!r}"
        )


async def test_to_device_messages_arrive_once_and_a_wildcard_reaches_every_device(clients: Clients):
    alice = await clients.register("alice")
    bob = await clients.register("bob")
    await sync(bob, timeout=0)

    content = {"hello": "bob", "n": 42, "nested": {"ok": True}}
    message = ToDeviceMessage("org.switchboard.test.ping", bob.user_id, bob.device_id, content)
    sent = await alice.to_device(message)
    assert isinstance(sent, ToDeviceResponse), f"to_device failed: {sent}"

    def received(resp: SyncResponse):
        return [
            e
            for e in resp.to_device_events
            if isinstance(e, UnknownToDeviceEvent) and e.type == "org.switchboard.test.ping"
        ]

    (event, *rest) = await sync_until(bob, received, "alice's to-device message")
    assert not rest, f"to-device message delivered {1 + len(rest)} times in one sync"
    assert event.sender == alice.user_id, f"to-device sender is {event.sender!r}"
    assert event.source.get("content") == content, f"to-device content is {event.source.get('content')!r}"

    # Delivered messages are deleted once bob's next sync acknowledges them.
    again = await sync(bob, timeout=0)
    assert not received(again), "to-device message redelivered after bob's since token advanced"

    # Wildcard device ("*") reaches every device of the user.
    wildcard = ToDeviceMessage("org.switchboard.test.ping", bob.user_id, "*", {"hello": "all"})
    sent = await alice.to_device(wildcard)
    assert isinstance(sent, ToDeviceResponse), f"wildcard to_device failed: {sent}"
    (event, *_) = await sync_until(bob, received, "alice's wildcard to-device message")
    assert event.source.get("content") == {"hello": "all"}, f"content {event.source.get('content')!r}"


async def test_typing_wakes_long_poll(clients: Clients):
    """A typing notification must wake the other user's pending /sync, not wait for its timeout."""
    alice = await clients.register("alice")
    bob = await clients.register("bob")
    room_id = await shared_room(alice, bob)

    poll = asyncio.create_task(bob.sync(timeout=10_000))
    await asyncio.sleep(0.3)
    assert not poll.done(), f"bob's long-poll answered before anyone typed: {poll.result()}"
    started = asyncio.get_running_loop().time()
    typing = await alice.room_typing(room_id, True, timeout=20_000)
    assert isinstance(typing, RoomTypingResponse), f"room_typing failed: {typing}"
    resp = await poll
    elapsed = asyncio.get_running_loop().time() - started
    assert isinstance(resp, SyncResponse), f"bob /sync failed: {resp}"
    assert any(
        isinstance(e, TypingNoticeEvent) and alice.user_id in e.users for e in ephemeral(resp, room_id)
    ), f"bob's woken sync lacks alice's typing notice: {ephemeral(resp, room_id)}"
    assert elapsed < 2.0, f"typing notice took {elapsed:.2f}s to wake bob's long-poll"
