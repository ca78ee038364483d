"""The Application Service API, with mautrix-python's ``AppService`` as the service.

mautrix is the framework the mautrix-* bridges are built on; here it listens on a
loopback port, registered with the homeserver through a registration file, and
talks to the homeserver the way a bridge does: pings, registers ghosts with
``m.login.application_service``, masquerades with ``?user_id=``, receives
transactions and answers alias queries.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_asyncio
from mautrix.api import Method, Path as MxPath
from mautrix.appservice import AppService
from mautrix.appservice.state_store import FileASStateStore
from mautrix.types import (
    Event,
    EventType,
    MessageEvent,
    RoomAlias,
    RoomCreatePreset,
    RoomDirectoryVisibility,
)
from nio import (
    JoinedMembersResponse,
    JoinError,
    JoinResponse,
    MessageDirection,
    RoomMessagesResponse,
    RoomMessageText,
    RoomResolveAliasResponse,
    RoomSendResponse,
    SyncResponse,
)

from conftest import (
    SERVER_NAME,
    AppServiceRegistration,
    Clients,
    Homeserver,
    NamespaceRule,
    free_port,
    user_id,
)

# mautrix passes loop= to aiohttp's web.Application, which aiohttp deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:loop argument is deprecated:DeprecationWarning")

AS_ID = "mautrix_interop"
BOT_LOCALPART = "_mx_bot"
GHOST = user_id("_mx_alice")
DELIVERY_TIMEOUT = 5.0  # seconds for an event to reach the service in a transaction


@pytest.fixture
def as_port() -> int:
    return free_port()


@pytest.fixture
def registration(as_port: int) -> AppServiceRegistration:
    return AppServiceRegistration(
        id=AS_ID,
        url=f"http://127.0.0.1:{as_port}",
        sender_localpart=BOT_LOCALPART,
        users=[NamespaceRule(rf"@_mx_.*:{SERVER_NAME}", exclusive=True)],
        aliases=[NamespaceRule(rf"#_mx_.*:{SERVER_NAME}", exclusive=True)],
        as_token=secrets.token_urlsafe(32),
        hs_token=secrets.token_urlsafe(32),
    )


@pytest.fixture
def app_service_registrations(registration: AppServiceRegistration) -> list[AppServiceRegistration]:
    # Overrides conftest's fixture: the `homeserver` of this module runs with our service.
    return [registration]


class Inbox:
    """Collects the events mautrix hands to its event handlers; waits for one to arrive."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()

    async def handle(self, event: Event) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float, what: str) -> Event:
        def find() -> Event | None:
            return next((e for e in self.events if predicate(e)), None)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: find() is not None), timeout)
            except TimeoutError:
                received = [(e.type.t, e.sender, getattr(e, "event_id", None)) for e in self.events]
                pytest.fail(f"the service did not receive {what} within {timeout}s; it got {received}")
            found = find()
            assert found is not None
            return found


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest_asyncio.fixture
async def appservice(
    homeserver: Homeserver,
    registration: AppServiceRegistration,
    as_port: int,
    inbox: Inbox,
    tmp_path: Path,
):
    service = AppService(
        server=homeserver.url,
        domain=SERVER_NAME,
        id=registration.id,
        as_token=registration.as_token,
        hs_token=registration.hs_token,
        bot_localpart=BOT_LOCALPART,
        loop=asyncio.get_running_loop(),
        log=logging.getLogger("mautrix-interop"),
        state_store=FileASStateStore(tmp_path / "mx-state.json", binary=False),
    )
    service.matrix_event_handler(inbox.handle)
    await service.start(host="127.0.0.1", port=as_port)
    service.ready = True
    try:
        yield service
    finally:
        await service.stop()


def body_of(event: Event) -> str | None:
    return getattr(getattr(event, "content", None), "body", None)


async def test_mautrix_bridges_messages_both_ways(
    homeserver: Homeserver,
    clients: Clients,
    appservice: AppService,
    inbox: Inbox,
    caplog: pytest.LogCaptureFixture,
):
    # 1. Ping: the homeserver calls the service's /_matrix/app/v1/ping and reports the round trip.
    caplog.set_level(logging.INFO, logger="mautrix-interop")
    duration = await appservice.ping_self()
    # mautrix turns a missing (or zero) duration_ms into -1; check the raw answer too.
    ping_txn = f"ping-{secrets.token_hex(4)}"
    raw = await appservice.intent.api.request(
        Method.POST,
        MxPath.v1.appservice[appservice.id].ping,
        content={"transaction_id": ping_txn},
    )
    assert isinstance(raw.get("duration_ms"), int) and raw["duration_ms"] >= 0, (
        f"ping response lacks a duration: {raw!r} (ping_self returned {duration})"
    )
    # mautrix raises on a failed ping and returns `duration_ms or -1`: -1 is a 0 ms round trip.
    assert duration == -1 or duration > 0, f"ping_self returned {duration}"
    assert any(ping_txn in record.getMessage() for record in caplog.records), (
        f"mautrix did not log a ping carrying transaction_id {ping_txn!r}: "
        f"{[r.getMessage() for r in caplog.records]}"
    )

    # 2. A ghost in the service's exclusive namespace: registered on first use, masqueraded.
    ghost = appservice.intent.user(GHOST)
    await ghost.ensure_registered()
    whoami = await ghost.whoami()
    assert whoami.user_id == GHOST, f"whoami as {GHOST} (as_token + ?user_id=) says {whoami.user_id}"
    bot_whoami = await appservice.intent.whoami()
    assert bot_whoami.user_id == appservice.bot_mxid, f"bot whoami says {bot_whoami.user_id}"

    room_id = await ghost.create_room(preset=RoomCreatePreset.PUBLIC, name="Bridged chat")

    # 3. A human joins the ghost's room.
    human = await clients.register("human")
    joined = await human.join(room_id)
    assert isinstance(joined, JoinResponse), f"human joining {room_id} failed: {joined}"
    await inbox.wait_for(
        lambda e: e.type == EventType.ROOM_MEMBER
        and e.state_key == human.user_id
        and e.room_id == room_id,
        DELIVERY_TIMEOUT,
        f"the human's join of {room_id}",
    )

    # 4. The ghost speaks; the human reads it.
    ghost_body = "hello from the other side of the bridge"
    ghost_event_id = await ghost.send_text(room_id, ghost_body)

    # 5. The human speaks; the service gets it in a transaction.
    human_body = "hello, bridge"
    started = time.monotonic()
    sent = await human.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": human_body})
    assert isinstance(sent, RoomSendResponse), f"human sending failed: {sent}"
    received = await inbox.wait_for(
        lambda e: getattr(e, "event_id", None) == sent.event_id,
        DELIVERY_TIMEOUT,
        f"the human's message {sent.event_id}",
    )
    elapsed = time.monotonic() - started
    assert isinstance(received, MessageEvent), f"received {type(received).__name__}: {received}"
    assert received.type == EventType.ROOM_MESSAGE, f"received event type {received.type}"
    assert received.sender == human.user_id, f"received sender {received.sender}"
    assert received.room_id == room_id, f"received room {received.room_id}"
    assert received.content.body == human_body, f"received body {received.content.body!r}"
    assert elapsed < DELIVERY_TIMEOUT, f"delivery took {elapsed:.2f}s"

    # The service also got its own ghost's message (its users' events are in its interest).
    await inbox.wait_for(
        lambda e: getattr(e, "event_id", None) == ghost_event_id,
        DELIVERY_TIMEOUT,
        f"the ghost's own message {ghost_event_id}",
    )

    sync = await human.sync(timeout=0)
    assert isinstance(sync, SyncResponse), f"human /sync failed: {sync}"
    assert room_id in sync.rooms.join, f"human's /sync lacks {room_id}"
    timeline = sync.rooms.join[room_id].timeline.events
    assert any(e.event_id == ghost_event_id for e in timeline), (
        f"human's /sync timeline of {room_id} lacks the ghost's message {ghost_event_id}: "
        f"{[e.source for e in timeline]}"
    )

    page = await human.room_messages(
        room_id, start=sync.next_batch, limit=20, direction=MessageDirection.back
    )
    assert isinstance(page, RoomMessagesResponse), f"human /messages failed: {page}"
    by_id = {e.event_id: e for e in page.chunk}
    assert ghost_event_id in by_id, (
        f"human's /messages lacks the ghost's {ghost_event_id}: {[e.source for e in page.chunk]}"
    )
    seen = by_id[ghost_event_id]
    assert isinstance(seen, RoomMessageText), f"ghost's event parsed as {type(seen).__name__}"
    assert seen.sender == GHOST, f"ghost's message sender is {seen.sender}"
    assert seen.body == ghost_body, f"ghost's message body is {seen.body!r}"

    members = await human.joined_members(room_id)
    assert isinstance(members, JoinedMembersResponse), f"joined_members failed: {members}"
    assert {m.user_id for m in members.members} == {GHOST, human.user_id}, (
        f"joined members are {[m.user_id for m in members.members]}"
    )


async def test_mautrix_creates_alias_on_query(
    homeserver: Homeserver, clients: Clients, appservice: AppService
):
    queried: list[str] = []
    created: dict[str, str] = {}

    async def query_alias(alias: RoomAlias) -> dict | None:
        queried.append(alias)
        localpart, _, server = alias[1:].partition(":")
        if server != SERVER_NAME or not localpart.startswith("_mx_lazy"):
            return None  # mautrix answers 404: no such alias
        room_id = await appservice.intent.create_room(
            alias_localpart=localpart,
            preset=RoomCreatePreset.PUBLIC,
            visibility=RoomDirectoryVisibility.PUBLIC,
            name=f"Portal {localpart}",
        )
        created[alias] = room_id
        return {"room_id": room_id}  # any non-empty answer is a 200

    # mautrix's AppService(query_alias=...) hook, set after construction.
    appservice.query_alias = query_alias

    human = await clients.register("human")

    # Joining an alias that does not exist yet: the server asks the service, which creates the
    # room during the query, and the join goes through in the same request.
    alias = f"#_mx_lazy:{SERVER_NAME}"
    joined = await human.join(alias)
    assert isinstance(joined, JoinResponse), f"joining {alias} failed: {joined}\nqueried: {queried}"
    assert queried == [alias], f"the service was queried for {queried}"
    assert joined.room_id == created[alias], f"join returned {joined.room_id}, created {created}"

    members = await human.joined_members(joined.room_id)
    assert isinstance(members, JoinedMembersResponse), f"joined_members failed: {members}"
    assert {m.user_id for m in members.members} == {appservice.bot_mxid, human.user_id}, (
        f"joined members are {[m.user_id for m in members.members]}"
    )

    # Now the alias exists: resolving it must not ask the service again.
    resolved = await human.room_resolve_alias(alias)
    assert isinstance(resolved, RoomResolveAliasResponse), f"resolving {alias} failed: {resolved}"
    assert resolved.room_id == joined.room_id
    assert queried == [alias], f"an existing alias was queried again: {queried}"

    # Directory lookup (GET /directory/room/{alias}) of an unknown alias creates it the same way.
    alias2 = f"#_mx_lazy_dir:{SERVER_NAME}"
    resolved2 = await human.room_resolve_alias(alias2)
    assert isinstance(resolved2, RoomResolveAliasResponse), f"resolving {alias2} failed: {resolved2}"
    assert resolved2.room_id == created[alias2], f"{alias2} resolved to {resolved2.room_id}, created {created}"

    # An alias the service declines stays unknown: the join fails with M_NOT_FOUND.
    missing = f"#_mx_nothing:{SERVER_NAME}"
    refused = await human.join(missing)
    assert isinstance(refused, JoinError), f"joining {missing} should fail, got {refused}"
    assert refused.status_code == "M_NOT_FOUND", f"joining {missing}: {refused}"
    assert queried[-1] == missing, f"the service was not asked about {missing}: {queried}"
