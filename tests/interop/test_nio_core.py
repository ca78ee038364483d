"""Core Client-Server API behaviour, exercised through matrix-nio."""

from __future__ import annotations

import asyncio
import time

from nio import (
    AsyncClient,
    BadEvent,
    JoinedMembersResponse,
    JoinResponse,
    LoginError,
    MessageDirection,
    RoomCreateResponse,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPreset,
    RoomResolveAliasResponse,
    RoomSendError,
    RoomSendResponse,
    SyncResponse,
    UnknownBadEvent,
    WhoamiResponse,
)
from nio.responses import RegisterErrorResponse

from conftest import SERVER_NAME, Clients, Homeserver, user_id

ALIAS = f"#chat:{SERVER_NAME}"
DELIVERY_BUDGET = 1.0  # seconds from room_send to the receiver's sync returning the message
LONG_POLL_MS = 5_000
MAX_PAGES = 20


def text(body: str) -> dict:
    return {"msgtype": "m.text", "body": body}


def assert_well_formed(events: list, where: str) -> None:
    bad = [e.source for e in events if isinstance(e, (BadEvent, UnknownBadEvent))]
    assert not bad, f"{where}: nio could not parse events: {bad}"


def timeline(resp: SyncResponse, room_id: str) -> list:
    room = resp.rooms.join.get(room_id)
    if room is None:
        return []
    assert_well_formed(room.timeline.events, f"sync timeline of {room_id}")
    return room.timeline.events


def messages(events: list) -> list[RoomMessageText]:
    return [e for e in events if isinstance(e, RoomMessageText)]


async def create_room(client: AsyncClient, **kwargs) -> str:
    resp = await client.room_create(**kwargs)
    assert isinstance(resp, RoomCreateResponse), f"createRoom failed: {resp}"
    return resp.room_id


async def send_text(client: AsyncClient, room_id: str, body: str, tx_id: str | None = None) -> str:
    resp = await client.room_send(room_id, "m.room.message", text(body), tx_id=tx_id)
    assert isinstance(resp, RoomSendResponse), f"{client.user_id} sending {body!r} failed: {resp}"
    return resp.event_id


async def sync(client: AsyncClient, **kwargs) -> SyncResponse:
    resp = await client.sync(**kwargs)
    assert isinstance(resp, SyncResponse), f"{client.user_id} /sync failed: {resp}"
    return resp


async def paginate_back(client: AsyncClient, room_id: str, token: str, limit: int = 10) -> list:
    """Pages /messages backwards from `token` to the start of the room; returns events newest first."""
    events: list = []
    for _ in range(MAX_PAGES):
        page = await client.room_messages(
            room_id, start=token, limit=limit, direction=MessageDirection.back
        )
        assert isinstance(page, RoomMessagesResponse), f"/messages from {token!r} failed: {page}"
        assert len(page.chunk) <= limit, f"/messages returned {len(page.chunk)} events for limit={limit}"
        assert_well_formed(page.chunk, f"/messages from {token!r}")
        events.extend(page.chunk)
        if not page.chunk or not page.end:
            return events
        assert page.end != token, f"/messages end token {page.end!r} did not advance"
        token = page.end
    raise AssertionError(f"/messages did not terminate after {MAX_PAGES} pages of {limit}")


async def assert_delivered_quickly(
    sender: AsyncClient, receiver: AsyncClient, room_id: str, body: str
) -> None:
    """`sender` sends `body` while `receiver` long-polls /sync; it must arrive within the budget."""
    poll = asyncio.create_task(receiver.sync(timeout=LONG_POLL_MS))
    await asyncio.sleep(0.2)  # let the long-poll reach the server before sending
    started = time.monotonic()
    event_id = await send_text(sender, room_id, body)

    seen: list[RoomMessageText] = []
    while True:
        resp = await poll
        assert isinstance(resp, SyncResponse), f"{receiver.user_id} /sync failed: {resp}"
        seen = [e for e in messages(timeline(resp, room_id)) if e.event_id == event_id]
        elapsed = time.monotonic() - started
        if seen or elapsed > 2 * LONG_POLL_MS / 1000:
            break
        poll = asyncio.create_task(receiver.sync(timeout=LONG_POLL_MS))

    assert seen, f"{receiver.user_id} never saw {event_id} ({body!r}) via /sync within {elapsed:.1f}s"
    assert elapsed < DELIVERY_BUDGET, (
        f"{receiver.user_id} saw {body!r} {elapsed:.2f}s after it was sent "
        f"(budget {DELIVERY_BUDGET}s; long-poll not woken by the new event?)"
    )
    (event,) = seen
    assert event.sender == sender.user_id, f"message sender is {event.sender!r}"
    assert event.body == body, f"message body is {event.body!r}"


async def test_two_users_chat_through_alias(clients: Clients):
    alice = await clients.register("alice")
    bob = await clients.register("bob")

    room_id = await create_room(alice, alias="chat", name="Chat", preset=RoomPreset.public_chat)

    resolved = await bob.room_resolve_alias(ALIAS)
    assert isinstance(resolved, RoomResolveAliasResponse), f"resolving {ALIAS} failed: {resolved}"
    assert resolved.room_id == room_id, f"{ALIAS} resolves to {resolved.room_id}, not {room_id}"

    joined = await bob.join(ALIAS)
    assert isinstance(joined, JoinResponse), f"bob joining {ALIAS} failed: {joined}"
    assert joined.room_id == room_id, f"joining {ALIAS} returned {joined.room_id}, not {room_id}"

    members = await alice.joined_members(room_id)
    assert isinstance(members, JoinedMembersResponse), f"joined_members failed: {members}"
    assert {m.user_id for m in members.members} == {alice.user_id, bob.user_id}, (
        f"joined members are {[m.user_id for m in members.members]}"
    )

    # Initial syncs establish each side's since token.
    for client in (alice, bob):
        resp = await sync(client, timeout=0)
        assert room_id in resp.rooms.join, f"{client.user_id}'s initial sync lacks {room_id}"

    await assert_delivered_quickly(alice, bob, room_id, "hello bob")
    await assert_delivered_quickly(bob, alice, room_id, "hi alice")


async def test_backward_pagination_from_next_batch(clients: Clients):
    alice = await clients.register("alice")
    room_id = await create_room(alice)
    sent = [await send_text(alice, room_id, f"message {i}") for i in range(30)]

    token = (await sync(alice, timeout=0)).next_batch
    events = await paginate_back(alice, room_id, token, limit=10)

    texts = messages(events)
    assert [e.body for e in texts] == [f"message {i}" for i in reversed(range(30))], (
        f"paginated bodies: {[e.body for e in texts]}"
    )
    assert [e.event_id for e in texts] == sent[::-1], "paginated event IDs differ from the sends"
    assert events[-1].source.get("type") == "m.room.create", (
        f"pagination ended at {events[-1].source.get('type')}, not the room's m.room.create"
    )


async def test_backward_pagination_from_prev_batch(clients: Clients):
    alice = await clients.register("alice")
    room_id = await create_room(alice)
    for i in range(30):
        await send_text(alice, room_id, f"message {i}")

    resp = await sync(alice, timeout=0, sync_filter={"room": {"timeline": {"limit": 5}}})
    room = resp.rooms.join.get(room_id)
    assert room is not None, f"initial sync lacks {room_id}"
    assert room.timeline.prev_batch, "a limited timeline must carry a prev_batch token"

    recent = [e.body for e in messages(timeline(resp, room_id))]
    older = [e.body for e in messages(await paginate_back(alice, room_id, room.timeline.prev_batch))]
    assert older[::-1] + recent == [f"message {i}" for i in range(30)], (
        f"history before prev_batch {older[::-1]} + timeline {recent} is not all 30 messages once, in order"
    )


async def test_non_member_cannot_send(clients: Clients):
    alice = await clients.register("alice")
    carol = await clients.register("carol")
    room_id = await create_room(alice, alias="chat", preset=RoomPreset.public_chat)

    resp = await carol.room_send(room_id, "m.room.message", text("let me in"))
    assert isinstance(resp, RoomSendError), f"non-member send was not refused: {resp}"
    assert resp.status_code == "M_FORBIDDEN", f"non-member send gave {resp.status_code}: {resp.message}"

    token = (await sync(alice, timeout=0)).next_batch
    senders = {e.sender for e in await paginate_back(alice, room_id, token)}
    assert carol.user_id not in senders, "the refused event still appears in the room's history"


async def test_restart_keeps_accounts_rooms_and_history(clients: Clients, homeserver: Homeserver):
    alice = await clients.register("alice")
    bob = await clients.register("bob")
    room_id = await create_room(alice, alias="chat", preset=RoomPreset.public_chat)
    assert isinstance(await bob.join(ALIAS), JoinResponse), "bob could not join"
    bodies = ["before restart 1", "before restart 2", "before restart 3"]
    for body in bodies:
        await send_text(alice, room_id, body)
    await clients.close_all()

    homeserver.restart()

    alice = await clients.login("alice")
    resp = await sync(alice, timeout=0)
    assert room_id in resp.rooms.join, f"after restart alice's sync lacks {room_id}: {list(resp.rooms.join)}"

    history = messages(await paginate_back(alice, room_id, resp.next_batch))
    assert [e.body for e in history] == bodies[::-1], f"history after restart: {[e.body for e in history]}"

    members = await alice.joined_members(room_id)
    assert isinstance(members, JoinedMembersResponse), f"joined_members failed: {members}"
    assert {m.user_id for m in members.members} == {user_id("alice"), user_id("bob")}, (
        f"joined members after restart: {[m.user_id for m in members.members]}"
    )

    resolved = await alice.room_resolve_alias(ALIAS)
    assert isinstance(resolved, RoomResolveAliasResponse), f"{ALIAS} lost after restart: {resolved}"
    assert resolved.room_id == room_id, f"{ALIAS} resolves to {resolved.room_id} after restart"


async def test_session_and_sync_token_survive_restart(clients: Clients, homeserver: Homeserver):
    alice = await clients.register("alice")
    bob = await clients.register("bob")
    room_id = await create_room(alice, alias="chat", preset=RoomPreset.public_chat)
    assert isinstance(await bob.join(ALIAS), JoinResponse), "bob could not join"
    await send_text(alice, room_id, "before restart")
    since = (await sync(alice, timeout=0)).next_batch
    # Drop pooled connections to the old process; the clients keep their access tokens.
    await alice.close()
    await bob.close()

    homeserver.restart()

    whoami = await alice.whoami()
    assert isinstance(whoami, WhoamiResponse), f"access token rejected after restart: {whoami}"
    assert whoami.user_id == alice.user_id, f"whoami after restart is {whoami.user_id}"

    event_id = await send_text(bob, room_id, "after restart")
    resp = await sync(alice, since=since, timeout=LONG_POLL_MS)
    bodies = [e.body for e in messages(timeline(resp, room_id))]
    assert bodies == ["after restart"], (
        f"sync since the pre-restart token {since!r} returned {bodies}, expected only {event_id}"
    )


async def test_send_with_same_txn_id_is_idempotent(clients: Clients):
    alice = await clients.register("alice")
    room_id = await create_room(alice)

    first = await send_text(alice, room_id, "only once", tx_id="txn-1")
    again = await send_text(alice, room_id, "only once", tx_id="txn-1")
    other = await send_text(alice, room_id, "a second message", tx_id="txn-2")
    assert again == first, f"retrying txn-1 gave {again}, first send gave {first}"
    assert other != first, "a new transaction ID reused the earlier event ID"

    token = (await sync(alice, timeout=0)).next_batch
    bodies = [e.body for e in messages(await paginate_back(alice, room_id, token))]
    assert bodies == ["a second message", "only once"], f"history holds {bodies}"


async def test_login_with_wrong_password_is_forbidden(clients: Clients):
    await clients.register("alice", "right password")

    for username, password in [("alice", "wrong password"), ("nobody", "right password")]:
        resp = await clients.new(username).login(password)
        assert isinstance(resp, LoginError), f"login as {username} with {password!r} succeeded: {resp}"
        assert resp.status_code == "M_FORBIDDEN", (
            f"login as {username} with {password!r} gave {resp.status_code}: {resp.message}"
        )

    await clients.login("alice", "right password")


async def test_register_existing_username_is_in_use(clients: Clients):
    await clients.register("alice")

    resp = await clients.new().register("alice", "another password")
    assert isinstance(resp, RegisterErrorResponse), f"registering alice twice succeeded: {resp}"
    assert resp.status_code == "M_USER_IN_USE", (
        f"registering alice twice gave {resp.status_code}: {resp.message}"
    )
