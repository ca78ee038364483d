"""A matrix-nio user (vodozemac) talks to the Rust SDK's encrypted echo example in an encrypted DM.

Run by the Rust tests (crates/switchboard/tests/api/sdk.rs), which start the homeserver and the
example: ``sdk_encrypted_echo.py <homeserver URL> <bot user ID> <store dir>``. Alice registers,
opens an encrypted DM with the bot and waits until it joined, then prints ``READY``. Each line
read from stdin is sent encrypted; once the bot's ``echo: <line>`` arrived and decrypted on
every device of hers, ``ECHOED <line>`` is printed. The line ``NEW DEVICE`` logs her in on a
second device (printed as ``DEVICE <id>``), which must decrypt the echoes from then on. Exits
non-zero with the reason on the first failure.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from nio import AsyncClient, MegolmEvent, RoomCreateResponse, RoomMessageText, RoomSendResponse

from federated_e2ee import MEGOLM, Failure, People, check, sync

ROUNDS = 30  # one-second sync rounds to wait for the bot


async def wait_for_echo(clients: list[AsyncClient], room_id: str, bot: str, text: str) -> None:
    wanted = f"echo: {text}"
    pending = {c.device_id: c for c in clients}
    undecryptable: list[str] = []
    for _ in range(ROUNDS):
        for device, client in list(pending.items()):
            resp = await sync(client, 1_000)
            room = resp.rooms.join.get(room_id)
            for event in room.timeline.events if room else []:
                if event.sender != bot:
                    continue
                if isinstance(event, RoomMessageText) and event.body == wanted:
                    check(event.decrypted, f"the bot's {wanted!r} came in the clear")
                    pending.pop(device, None)
                elif isinstance(event, MegolmEvent):
                    undecryptable.append(f"{device}: {event.event_id}")
        if not pending:
            return
    raise Failure(
        f"{sorted(pending)} never decrypted {wanted!r} (undecryptable from the bot: {undecryptable})"
    )


async def main(url: str, bot: str, store: str) -> None:
    people = People(Path(store))
    try:
        alice = await people.register(url, "alice")
        created = await alice.room_create(
            is_direct=True,
            invite=[bot],
            initial_state=[{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}],
        )
        check(isinstance(created, RoomCreateResponse), f"createRoom: {created}")
        room_id = created.room_id
        for _ in range(ROUNDS):
            await sync(alice, 1_000)
            room = alice.rooms.get(room_id)
            if room is not None and bot in room.users and bot not in room.invited_users:
                break
        else:
            raise Failure(f"{bot} never joined {room_id}")
        await sync(alice)  # the /keys/query for the bot's device
        clients = [alice]
        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            text = line.strip()
            if text == "NEW DEVICE":
                second = await people.second_device(url, alice, "alice-2")
                await sync(second)
                await sync(alice)
                clients.append(second)
                print(f"DEVICE {second.device_id}", flush=True)
                continue
            sent = await alice.room_send(
                room_id,
                "m.room.message",
                {"msgtype": "m.text", "body": text},
                ignore_unverified_devices=True,
            )
            check(isinstance(sent, RoomSendResponse), f"sending {text!r}: {sent}")
            await wait_for_echo(clients, room_id, bot, text)
            print(f"ECHOED {text}", flush=True)
    finally:
        await people.close()


if __name__ == "__main__":
    try:
        asyncio.run(main(*sys.argv[1:4]))
    except Failure as e:
        print(f"FAILED {e}", flush=True)
        sys.exit(1)
