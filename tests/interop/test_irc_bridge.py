"""The IRC bridge (crates/switchboard-irc) end to end: a real IRC server (ngircd from Debian), the
bridge, Switchboard, a matrix-nio user and a raw-socket IRC client playing the IRC people.

Covered so far: joining `#irc_test_#room` that does not exist creates the room and puts the bridge
bot in the channel; IRC messages, emotes, notices and formatting reach Matrix from the right
virtual users.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from nio import (
    JoinResponse,
    MegolmEvent,
    RoomMessageEmote,
    RoomMessageNotice,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)

from conftest import (
    REPO_ROOT,
    SERVER_NAME,
    SYNAPSE_APPSERVICE_ENCRYPTION,
    Homeserver,
    Synapse,
    free_port,
    register_user,
    server_binary,
)
from federated_e2ee import MEGOLM, People, sync

READY_TIMEOUT = 30.0
# How long to wait for something that should happen. Every wait is for a condition and ends as soon
# as it holds, so only a failure waits this out: it is generous, for a machine busy with builds.
EVENTUALLY = 60.0
NGIRCD = "/usr/sbin/ngircd"


def bridge_binary() -> Path:
    configured = os.environ.get("SWITCHBOARD_IRC_BIN")
    return Path(configured) if configured else REPO_ROOT / "target/debug/switchboard-irc"


def wait_for(predicate, what: str, timeout: float = READY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class IrcServer:
    """ngircd on a plain port (the IRC people use it) and, with `tls`, a TLS port whose
    self-signed certificate is in `self.certificate`."""

    def __init__(self, data_dir: Path, tls: bool = False):
        if not os.access(NGIRCD, os.X_OK):
            pytest.fail(f"{NGIRCD} not found: run `bash tests/interop/setup.sh irc`")
        self.port = free_port()
        self.tls_port = free_port()
        self.certificate = data_dir / "irc-cert.pem"
        self.config = data_dir / "ngircd.conf"
        self.log = data_dir / "ngircd.log"
        ssl = ""
        if tls:
            key = data_dir / "irc-key.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-keyout", str(key), "-out", str(self.certificate), "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                 # A server certificate, not a CA (rustls refuses a CA used as the server's).
                 "-addext", "basicConstraints=critical,CA:FALSE"],
                check=True,
                capture_output=True,
            )
            ssl = f"[SSL]\n\tCertFile = {self.certificate}\n\tKeyFile = {key}\n\tPorts = {self.tls_port}\n"
        self.config.write_text(
            f"""[Global]
\tName = irc.test
\tInfo = Switchboard test IRC server
\tListen = 127.0.0.1
\tPorts = {self.port}
\tMotdPhrase = "test"
\tPidFile = {data_dir / "ngircd.pid"}
[Limits]
\tMaxNickLength = 30
[Options]
\tPAM = no
\tDNS = no
\tIdent = no
{ssl}"""
        )
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NGIRCD, "--nodaemon", "--config", str(self.config)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

        def listening():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(listening, "ngircd to listen")

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class IrcPerson:
    """A raw-socket IRC client."""

    def __init__(self, port: int, nick: str):
        self.nick = nick
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = ""
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :{nick}")
        self.expect(rf"^:\S+ 001 {nick} ")

    def send(self, line: str) -> None:
        self.sock.sendall(f"{line}\r\n".encode())

    def expect(self, pattern: str, timeout: float = EVENTUALLY) -> str:
        """Reads lines (answering PINGs) until one matches `pattern`; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while "\r\n" in self.buffer:
                line, self.buffer = self.buffer.split("\r\n", 1)
                if line.startswith("PING"):
                    self.send("PONG" + line[4:])
                if re.search(pattern, line):
                    return line
                self.skipped = (getattr(self, "skipped", []) + [line])[-10:]
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                break
            self.buffer += chunk.decode(errors="replace")
        pytest.fail(
            f"{self.nick}: no line matching {pattern!r}; last lines: {getattr(self, 'skipped', [])}"
        )

    def close(self) -> None:
        self.sock.close()


class Bridge:
    """The switchboard-irc process."""

    def __init__(self, config: Path, stderr: Path):
        self.config = config
        self.stderr = stderr
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.stderr.write_text("")
        self.proc = subprocess.Popen(
            [str(bridge_binary()), "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("ab"),
            env={**os.environ, "NO_COLOR": "1"},
        )
        wait_for(lambda: "application service ready" in self.stderr.read_text(), "the bridge to start")

    def as_token(self) -> str:
        """The service's `as_token`, from the registration next to the config."""
        text = (self.config.parent / "irc.yaml").read_text()
        match = re.search(r"""^as_token:\s*['"]?([^'"\s]+)""", text, re.MULTILINE)
        assert match, f"no as_token in the registration:\n{text}"
        return match.group(1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def in_channel(irc: IrcServer, nick: str, channel: str) -> IrcPerson:
    """An IRC person who has joined `channel`."""
    person = IrcPerson(irc.port, nick)
    person.send(f"JOIN {channel}")
    person.expect(rf" JOIN :?{channel}")
    return person


@pytest.fixture
def bridged(request, tmp_path: Path):
    """ngircd + a homeserver (Switchboard unless parametrized with "synapse") + the bridge."""
    if not os.access(bridge_binary(), os.X_OK):
        pytest.fail(f"switchboard-irc not found at {bridge_binary()} (cargo build)")
    kind = getattr(request, "param", "switchboard")
    encrypted = kind.startswith("encrypted")
    irc = IrcServer(tmp_path, tls=kind == "tls")
    bridge_port = free_port()
    registration = tmp_path / "irc.yaml"
    subprocess.run(
        [
            str(bridge_binary()),
            "generate-registration",
            "--url",
            f"http://127.0.0.1:{bridge_port}",
            "--server-name",
            SERVER_NAME,
            "--output",
            str(registration),
        ]
        + (["--encryption"] if encrypted else []),
        check=True,
        capture_output=True,
    )
    if kind in ("synapse", "encrypted-synapse"):
        extra = SYNAPSE_APPSERVICE_ENCRYPTION if encrypted else ""
        server = Synapse(tmp_path, free_port(), [registration], extra_config=extra)
    else:
        server = Homeserver(server_binary(), tmp_path, free_port(), app_service_files=[registration])
    server.start()
    config = tmp_path / "irc-bridge.yaml"
    network_connection = (
        f"port: {irc.tls_port}, tls: true, tls_ca_file: {irc.certificate.name}"
        if kind == "tls"
        else f"port: {irc.port}"
    )
    limit = {"one-connection": ", max_connections: 1", "idle": ", idle_timeout_secs: 2"}.get(kind, "")
    config.write_text(
        f"""homeserver: {{url: "{server.url}", domain: {SERVER_NAME}}}
listen: 127.0.0.1:{bridge_port}
registration: irc.yaml
data_dir: irc-state
encryption: {str(encrypted).lower()}
encrypt_channel_rooms: {str(encrypted).lower()}
networks:
  - {{id: test, name: Test IRC, host: 127.0.0.1, bot_nick: MatrixBridge,
      flood_burst: 20, flood_interval_ms: 50, {network_connection}{limit}}}
"""
    )
    bridge = Bridge(config, tmp_path / "bridge.stderr")
    try:
        bridge.start()
        yield server, irc, bridge
    finally:
        bridge.stop()
        server.stop()
        irc.stop()
        print(bridge.stderr.read_text()[-4000:])
        print(server.log_tail())


@pytest.mark.parametrize("bridged", ["switchboard", "synapse"], indirect=True)
async def test_joining_a_channel_alias_bridges_the_channel(bridged):
    server, irc, bridge = bridged
    carol = in_channel(irc, "carol", "#room")
    alice = await register_user(server.url, "alice")
    try:
        joined = await alice.join(f"#irc_test_#room:{SERVER_NAME}")
        assert isinstance(joined, JoinResponse), joined
        room_id = joined.room_id
        # The bridge bot is in the channel.
        carol.expect(r"^:MatrixBridge!\S+ JOIN :?#room")

        sync = await alice.sync(timeout=0)
        assert isinstance(sync, SyncResponse), sync
        carol.send("PRIVMSG #room :hello from \x02IRC\x02")
        carol.send("PRIVMSG #room :\x01ACTION waves\x01")
        carol.send("NOTICE #room :a notice")

        seen: list = []
        deadline = time.monotonic() + EVENTUALLY
        while len(seen) < 3 and time.monotonic() < deadline:
            sync = await alice.sync(timeout=2000, since=sync.next_batch)
            assert isinstance(sync, SyncResponse), sync
            room = sync.rooms.join.get(room_id)
            if room:
                seen += [
                    e
                    for e in room.timeline.events
                    if isinstance(e, (RoomMessageText, RoomMessageEmote, RoomMessageNotice))
                ]
        assert len(seen) == 3, seen
        carol_id = f"@irc_test_carol:{SERVER_NAME}"
        assert all(e.sender == carol_id for e in seen), [e.sender for e in seen]
        text, emote, notice = seen
        assert isinstance(text, RoomMessageText) and text.body == "hello from IRC"
        assert text.formatted_body == "hello from <b>IRC</b>"
        assert isinstance(emote, RoomMessageEmote) and emote.body == "waves"
        assert isinstance(notice, RoomMessageNotice) and notice.body == "a notice"
        name = await alice.get_displayname(carol_id)
        assert name.displayname == "carol", name

        # Matrix → IRC: alice speaks on IRC through her own connection (a puppet), as "alice".
        await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hi carol\nsecond line"})
        first = carol.expect(r"PRIVMSG #room :hi carol$")
        assert first.startswith(":alice!"), first
        carol.expect(r"^:alice!\S+ PRIVMSG #room :second line$")
        await alice.room_send(room_id, "m.room.message", {"msgtype": "m.emote", "body": "dances"})
        carol.expect("^:alice!\\S+ PRIVMSG #room :\x01ACTION dances\x01$")

        # Her own lines are not bridged back to Matrix as an IRC person.
        carol.send("PRIVMSG #room :after alice")
        echoed = []
        deadline = time.monotonic() + EVENTUALLY
        while time.monotonic() < deadline:
            sync = await alice.sync(timeout=1000, since=sync.next_batch)
            room = sync.rooms.join.get(room_id)
            events = room.timeline.events if room else []
            echoed += [e.sender for e in events if isinstance(e, RoomMessageText)]
            if any(e.body == "after alice" for e in events if isinstance(e, RoomMessageText)):
                break
        else:
            pytest.fail(f"carol's line after alice's never arrived: {echoed}")
        assert f"@irc_test_alice:{SERVER_NAME}" not in echoed, echoed

        # A restart of the bridge keeps the mapping: the bot rejoins, the same room goes on.
        bridge.stop()
        carol.expect(r"^:MatrixBridge!\S+ QUIT")
        bridge.start()
        carol.expect(r"^:MatrixBridge!\S+ JOIN :?#room")
        carol.send("PRIVMSG #room :after the restart")
        deadline = time.monotonic() + EVENTUALLY
        while time.monotonic() < deadline:
            sync = await alice.sync(timeout=1000, since=sync.next_batch)
            room = sync.rooms.join.get(room_id)
            bodies = [e.body for e in (room.timeline.events if room else []) if isinstance(e, RoomMessageText)]
            if "after the restart" in bodies:
                break
        else:
            pytest.fail("nothing bridged after the restart")
        again = await alice.join(f"#irc_test_#room:{SERVER_NAME}")
        assert isinstance(again, JoinResponse) and again.room_id == room_id, again
    finally:
        await alice.close()
        carol.close()
        await asyncio.sleep(0)


def thirdparty(server: Homeserver, token: str, path: str):
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{server.url}/_matrix/client/v3/thirdparty/{path}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def joined_rooms_as(server: Homeserver, as_token: str, user_id: str) -> set[str]:
    """The rooms a user of the bridge's namespace is in, asked as the service (`?user_id=`)."""
    import json
    import urllib.parse
    import urllib.request

    request = urllib.request.Request(
        f"{server.url}/_matrix/client/v3/joined_rooms?user_id={urllib.parse.quote(user_id)}",
        headers={"Authorization": f"Bearer {as_token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return set(json.load(response)["joined_rooms"])


async def members(client, room_id: str) -> set[str]:
    response = await client.joined_members(room_id)
    return {m.user_id for m in response.members}


async def eventually(check, what: str, timeout: float = EVENTUALLY):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


async def test_channel_members_topics_and_edits_are_bridged_and_survive_an_irc_restart(bridged):
    server, irc, _bridge = bridged
    carol = in_channel(irc, "carol", "#hall")
    carol.send("TOPIC #hall :the great hall")
    carol.expect(r" TOPIC #hall :the great hall")
    alice = await register_user(server.url, "alice")
    try:
        # Clients find channels through the third-party lookups.
        protocols = thirdparty(server, alice.access_token, "protocols")
        assert protocols["irc"]["instances"][0]["fields"] == {"network": "test"}, protocols
        location = thirdparty(server, alice.access_token, "location/irc?network=test&channel=%23hall")
        alias = location[0]["alias"]
        assert alias == f"#irc_test_#hall:{SERVER_NAME}", location
        user = thirdparty(server, alice.access_token, "user/irc?network=test&nickname=carol")
        assert user[0]["userid"] == f"@irc_test_carol:{SERVER_NAME}", user

        joined = await alice.join(alias)
        assert isinstance(joined, JoinResponse), joined
        room_id = joined.room_id
        topic = await alice.room_get_state_event(room_id, "m.room.topic")
        assert topic.content.get("topic") == "the great hall", "the room takes the channel's topic"
        carol_id = f"@irc_test_carol:{SERVER_NAME}"
        # carol was in the channel before the room existed: her virtual user is in the room.
        await eventually(lambda: _has(alice, room_id, carol_id), "carol in the room")

        dave = in_channel(irc, "dave", "#hall")
        await eventually(lambda: _has(alice, room_id, f"@irc_test_dave:{SERVER_NAME}"), "dave joining")
        dave.send("NICK dave2")
        await eventually(
            lambda: _has(alice, room_id, f"@irc_test_dave2:{SERVER_NAME}", f"@irc_test_dave:{SERVER_NAME}"),
            "dave's nick change (old user leaves, new one joins)",
        )
        dave.send("QUIT :bye")
        await eventually(
            lambda: _has(alice, room_id, None, f"@irc_test_dave2:{SERVER_NAME}"), "dave2 quitting"
        )

        carol.send("TOPIC #hall :a \x02new\x02 topic")

        async def topic_set():
            response = await alice.room_get_state_event(room_id, "m.room.topic")
            return getattr(response, "content", {}).get("topic") == "a new topic"

        await eventually(topic_set, "the topic")

        sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "tpyo"})
        carol.expect(r"^:alice!\S+ PRIVMSG #hall :tpyo$")
        await alice.room_send(
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": "* typo",
                "m.new_content": {"msgtype": "m.text", "body": "typo"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": sent.event_id},
            },
        )
        carol.expect(r"^:alice!\S+ PRIVMSG #hall :\* typo$")

        erin = in_channel(irc, "erin", "#hall")
        erin_id = f"@irc_test_erin:{SERVER_NAME}"
        await eventually(lambda: _has(alice, room_id, erin_id), "erin joining")

        # The IRC server restarts: the bot and alice's puppet come back and rejoin by themselves.
        # erin does not come back: the bot never sees her leave, only her missing from the names.
        carol.close()
        irc.restart()
        erin.close()
        carol = IrcPerson(irc.port, "carol")
        carol.send("JOIN #hall")
        # The bot is back in the channel: seen joining, or already there when carol joins.
        carol.expect(r"^:MatrixBridge!\S+ JOIN :?#hall|^:\S+ 353 carol \S #hall :.*MatrixBridge")
        carol.send("PRIVMSG #hall :back again")

        async def back_again():
            response = await alice.room_messages(room_id, start="", limit=10)
            return any(getattr(e, "body", None) == "back again" for e in response.chunk)

        await eventually(back_again, "a message after the IRC server restarted")
        await eventually(
            lambda: _has(alice, room_id, carol_id, erin_id), "erin, gone during the outage, leaving"
        )
        await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "me too"})
        carol.expect(r"^:alice!\S+ PRIVMSG #hall :me too$")

        # Leaving the room leaves the channel.
        await alice.room_leave(room_id)
        carol.expect(r"^:alice!\S+ PART #hall")
    finally:
        await alice.close()
        carol.close()


async def _has(client, room_id: str, present: str | None, absent: str | None = None) -> bool:
    now = await members(client, room_id)
    return (present is None or present in now) and (absent is None or absent not in now)


async def test_private_chats_both_ways(bridged):
    server, irc, bridge = bridged
    carol = IrcPerson(irc.port, "carol")
    dave = IrcPerson(irc.port, "dave")
    carol.send("JOIN #pm")
    carol.expect(r" JOIN :?#pm")
    alice = await register_user(server.url, "alice")
    try:
        joined = await alice.join(f"#irc_test_#pm:{SERVER_NAME}")
        assert isinstance(joined, JoinResponse), joined
        await alice.room_send(joined.room_id, "m.room.message", {"msgtype": "m.text", "body": "hi"})
        carol.expect(r"^:alice!\S+ PRIVMSG #pm :hi$")

        # An IRC person writes to alice's nick: she is invited to a private chat with them.
        # (Synced first: an invite that came before the first sync would not be among the news.)
        sync = await alice.sync(timeout=0)
        carol.send("PRIVMSG alice :psst")
        dm_room = None
        deadline = time.monotonic() + EVENTUALLY
        while dm_room is None and time.monotonic() < deadline:
            sync = await alice.sync(timeout=1000, since=sync.next_batch)
            for room_id in sync.rooms.invite:
                dm_room = room_id
        assert dm_room, "no invite for the private chat"
        assert isinstance(await alice.join(dm_room), JoinResponse)
        messages = await alice.room_messages(dm_room, start="", limit=20)
        bodies = [(e.sender, e.body) for e in messages.chunk if isinstance(e, RoomMessageText)]
        assert (f"@irc_test_carol:{SERVER_NAME}", "psst") in bodies, bodies
        await alice.room_send(dm_room, "m.room.message", {"msgtype": "m.text", "body": "hi back"})
        carol.expect(r"^:alice!\S+ PRIVMSG carol :hi back$")

        # alice leaves the chat: carol's next message opens a new one, with a new invite.
        await alice.room_leave(dm_room)
        # The leave reaches the bridge in a transaction of its own; until the bridge has ended the
        # chat, carol's lines still go to the old room. Ending it, her user leaves that room last.
        carol_id = f"@irc_test_carol:{SERVER_NAME}"
        as_token = bridge.as_token()

        async def chat_ended() -> bool:
            return dm_room not in joined_rooms_as(server, as_token, carol_id)

        await eventually(chat_ended, "the bridge ending the private chat alice left")
        carol.send("PRIVMSG alice :still there?")
        new_dm = None
        deadline = time.monotonic() + EVENTUALLY
        while new_dm is None and time.monotonic() < deadline:
            sync = await alice.sync(timeout=1000, since=sync.next_batch)
            new_dm = next((r for r in sync.rooms.invite if r != dm_room), None)
        assert new_dm, "no invite to a new private chat after leaving the old one"

        # A Matrix user starts one: inviting an IRC person's user makes it a private chat.
        created = await alice.room_create(is_direct=True, invite=[f"@irc_test_dave:{SERVER_NAME}"])
        assert hasattr(created, "room_id"), created

        async def dave_joined():
            return await _has(alice, created.room_id, f"@irc_test_dave:{SERVER_NAME}")

        await eventually(dave_joined, "dave's user accepting the invite")
        await alice.room_send(created.room_id, "m.room.message", {"msgtype": "m.text", "body": "hello dave"})
        dave.expect(r"^:alice!\S+ PRIVMSG dave :hello dave$")
    finally:
        await alice.close()
        carol.close()
        dave.close()


async def test_bot_commands_in_an_admin_room(bridged):
    server, irc, _bridge = bridged
    carol = in_channel(irc, "carol", "#cmd")
    alice = await register_user(server.url, "alice")
    try:
        # Synced before the room exists, so the bot's greeting is among the news whenever it comes.
        sync = await alice.sync(timeout=0)
        bot_id = f"@irc:{SERVER_NAME}"
        admin = await alice.room_create(is_direct=True, invite=[bot_id])
        assert hasattr(admin, "room_id"), admin
        invites: list[str] = []

        async def notices() -> list[str]:
            nonlocal sync
            sync = await alice.sync(timeout=1000, since=sync.next_batch)
            invites.extend(sync.rooms.invite)
            room = sync.rooms.join.get(admin.room_id)
            return [e.body for e in (room.timeline.events if room else []) if isinstance(e, RoomMessageNotice)]

        async def notice_containing(expect: str, what: str) -> str:
            deadline = time.monotonic() + EVENTUALLY
            while time.monotonic() < deadline:
                for body in await notices():
                    if expect in body:
                        return body
            pytest.fail(f"timed out waiting for {what} (a notice containing {expect!r})")

        async def reply_to(command: str, expect: str) -> str:
            await alice.room_send(admin.room_id, "m.room.message", {"msgtype": "m.text", "body": command})
            return await notice_containing(expect, f"the reply to {command!r}")

        # The homeserver hands a room's messages to the bridge only once its bot is a member (as
        # Synapse does): a command sent while the bot is merely invited never reaches it. The bot
        # joins when the invite reaches the bridge, takes the room as alice's admin room, then
        # greets her; commands are sent after that.
        await eventually(lambda: _has(alice, admin.room_id, bot_id), "the bot joining the admin room")
        await notice_containing("Send !help", "the bot's greeting in the admin room")
        await reply_to("!help", "!join <network> <#channel>")
        await reply_to("!nick test alicia", "now alicia")
        await reply_to("!join nowhere #x", "Unknown network")
        await reply_to("!join test #cmd", "Invited you to #cmd")
        carol.expect(r"^:MatrixBridge!\S+ JOIN :?#cmd")
        deadline = time.monotonic() + EVENTUALLY
        while not invites and time.monotonic() < deadline:
            await notices()
        assert invites, "no invite to the channel room"
        invited = invites[0]
        assert isinstance(await alice.join(invited), JoinResponse)
        await alice.room_send(invited, "m.room.message", {"msgtype": "m.text", "body": "hi from alicia"})
        carol.expect(r"^:alicia!\S+ PRIVMSG #cmd :hi from alicia$")
    finally:
        await alice.close()
        carol.close()


@pytest.mark.parametrize("bridged", ["tls"], indirect=True)
async def test_the_bridge_reaches_networks_over_tls(bridged):
    server, irc, _bridge = bridged
    carol = in_channel(irc, "carol", "#secure")
    alice = await register_user(server.url, "alice")
    try:
        joined = await alice.join(f"#irc_test_#secure:{SERVER_NAME}")
        assert isinstance(joined, JoinResponse), joined
        await alice.room_send(joined.room_id, "m.room.message", {"msgtype": "m.text", "body": "over tls"})
        # The bot and alice's puppet talk to the server over TLS; carol, on the plain port, hears.
        carol.expect(r"^:alice!\S+ PRIVMSG #secure :over tls$")
        # ngircd tells of a connection over TLS in WHOIS (numeric 275, "connected via SSL").
        carol.send("WHOIS alice")
        carol.expect(r"^:\S+ 275 carol alice :is connected via SSL")
    finally:
        await alice.close()
        carol.close()


@pytest.mark.parametrize("bridged", ["one-connection"], indirect=True)
async def test_beyond_max_connections_the_bot_speaks_for_people(bridged):
    server, irc, _bridge = bridged
    carol = in_channel(irc, "carol", "#busy")
    alice = await register_user(server.url, "alice")
    bob = await register_user(server.url, "bob")
    try:
        joined = await alice.join(f"#irc_test_#busy:{SERVER_NAME}")
        assert isinstance(joined, JoinResponse), joined
        room_id = joined.room_id
        assert isinstance(await bob.join(room_id), JoinResponse)
        # alice takes the network's one puppet connection…
        await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "first"})
        carol.expect(r"^:alice!\S+ PRIVMSG #busy :first$")
        # …so the bot relays bob, naming him.
        await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "second"})
        carol.expect(r"^:MatrixBridge!\S+ PRIVMSG #busy :<bob> second$")
    finally:
        await alice.close()
        await bob.close()
        carol.close()


@pytest.mark.parametrize("bridged", ["idle"], indirect=True)
async def test_idle_connections_quit_and_come_back(bridged):
    server, irc, _bridge = bridged
    carol = in_channel(irc, "carol", "#quiet")
    alice = await register_user(server.url, "alice")
    try:
        joined = await alice.join(f"#irc_test_#quiet:{SERVER_NAME}")
        assert isinstance(joined, JoinResponse), joined
        await alice.room_send(joined.room_id, "m.room.message", {"msgtype": "m.text", "body": "hello"})
        carol.expect(r"^:alice!\S+ PRIVMSG #quiet :hello$")
        # Two seconds without a word (idle_timeout_secs: 2): alice's connection quits…
        # (ngircd shows its own reason for a client that quits this soon after connecting.)
        carol.expect(r"^:alice!\S+ QUIT")
        # …and her next message brings it back, into the channel, with the same nick.
        await alice.room_send(joined.room_id, "m.room.message", {"msgtype": "m.text", "body": "back"})
        carol.expect(r"^:alice!\S+ JOIN :?#quiet")
        carol.expect(r"^:alice!\S+ PRIVMSG #quiet :back$")
    finally:
        await alice.close()
        carol.close()


async def send_encrypted(client, room_id: str, body: str) -> None:
    sent = await client.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": body}, ignore_unverified_devices=True
    )
    assert isinstance(sent, RoomSendResponse), sent


async def decrypted_from(client, room_id: str, sender: str, body: str) -> None:
    """Syncs until `sender`'s `body` arrives in `room_id`, decrypted."""
    undecryptable = []
    deadline = time.monotonic() + EVENTUALLY
    while time.monotonic() < deadline:
        resp = await sync(client, 1_000)
        room = resp.rooms.join.get(room_id)
        for event in room.timeline.events if room else []:
            if event.sender != sender:
                continue
            if isinstance(event, RoomMessageText) and event.body == body:
                assert event.decrypted, f"{body!r} came in the clear"
                return
            if isinstance(event, MegolmEvent):
                undecryptable.append(event.event_id)
    pytest.fail(f"{client.user_id} never decrypted {body!r} from {sender} (undecryptable: {undecryptable})")


@pytest.mark.parametrize("bridged", ["encrypted", "encrypted-synapse"], indirect=True)
async def test_encrypted_rooms_and_private_chats(bridged, tmp_path: Path):
    """With `encryption: true` the bridge reads and writes encrypted rooms and private chats:
    a matrix-nio user with end-to-end encryption (vodozemac) talks to IRC people in an encrypted
    channel room, in a private chat she starts and in one an IRC person starts."""
    server, irc, _bridge = bridged
    carol = in_channel(irc, "carol", "#secret")
    dave = IrcPerson(irc.port, "dave")
    erin = IrcPerson(irc.port, "erin")
    people = People(tmp_path / "nio")
    encryption = [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}]
    try:
        alice = await people.register(server.url, "alice")
        joined = await alice.join(f"#irc_test_#secret:{SERVER_NAME}")
        assert isinstance(joined, JoinResponse), joined
        room_id = joined.room_id
        # She sees the channel's room encrypted, then asks for the members' devices (the bot's).
        await sync(alice)
        await sync(alice)
        assert alice.rooms[room_id].encrypted, "the bridge made the channel's room encrypted"
        await send_encrypted(alice, room_id, "a secret hello")
        carol.expect(r"^:alice!\S+ PRIVMSG #secret :a secret hello$")
        carol.send("PRIVMSG #secret :a secret reply")
        await decrypted_from(alice, room_id, f"@irc_test_carol:{SERVER_NAME}", "a secret reply")

        # A private chat alice starts: dave's user accepts, with a device of its own (no bot in
        # the chat: the SDK gives a user joining an encrypted room a device).
        dave_id = f"@irc_test_dave:{SERVER_NAME}"
        created = await alice.room_create(is_direct=True, invite=[dave_id], initial_state=encryption)
        assert hasattr(created, "room_id"), created
        dm = created.room_id

        async def dave_joined():
            return await _has(alice, dm, dave_id)

        await eventually(dave_joined, "dave's user in the private chat")

        async def knows_daves_device():
            # The device is made right after the join: she hears of it (device_lists.changed).
            await sync(alice, 500)
            return bool(list(alice.device_store.active_user_devices(dave_id)))

        await eventually(knows_daves_device, "alice learning the device of dave's user")
        await send_encrypted(alice, dm, "a private hello")
        dave.expect(r"^:alice!\S+ PRIVMSG dave :a private hello$")
        dave.send("PRIVMSG alice :a private reply")
        await decrypted_from(alice, dm, dave_id, "a private reply")

        # A private chat erin starts: encrypted, her user's device made before the invite.
        erin.send("PRIVMSG alice :are you there?")
        invited = None
        deadline = time.monotonic() + EVENTUALLY
        while invited is None and time.monotonic() < deadline:
            resp = await sync(alice, 1_000)
            invited = next((r for r in resp.rooms.invite if r not in (room_id, dm)), None)
        assert invited, "no invite to erin's private chat"
        assert isinstance(await alice.join(invited), JoinResponse)
        # Her first words were said before alice joined: the key went to invited members too.
        await decrypted_from(alice, invited, f"@irc_test_erin:{SERVER_NAME}", "are you there?")
        await sync(alice)
        assert alice.rooms[invited].encrypted, "the chat an IRC person opens is encrypted"
        await send_encrypted(alice, invited, "yes, here")
        erin.expect(r"^:alice!\S+ PRIVMSG erin :yes, here$")
        erin.send("PRIVMSG alice :good")
        await decrypted_from(alice, invited, f"@irc_test_erin:{SERVER_NAME}", "good")
    finally:
        await people.close()
        carol.close()
        dave.close()
        erin.close()
