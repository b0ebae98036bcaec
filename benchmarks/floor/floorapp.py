"""Flower's floor for one deployment round: the ClientApp echoes the arrays it gets; the
ServerApp sends them to every node and waits for the replies with Flower's own
``Grid.send_and_receive`` (3 s between pulls; with ``poll`` > 0, its own pulls that far
apart), one exchange per round, and writes each round's seconds to
``out`` (JSON). Used by benchmarks/deployment_floor.py."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def echo(message: Message, context: Context) -> Message:
    return Message(content=message.content, reply_to=message)


def _exchange(grid: Grid, messages: list[Message], poll: float) -> list[Message]:
    if poll <= 0:
        return list(grid.send_and_receive(messages, timeout=600))
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + 600
    while waiting and time.monotonic() < deadline:
        time.sleep(poll)
        for reply in grid.pull_messages(waiting):
            replies.append(reply)
            waiting.discard(reply.metadata.reply_to_message_id)
    return replies


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    hospitals, rounds = int(config["hospitals"]), int(config["rounds"])
    while len(list(grid.get_node_ids())) < hospitals:
        time.sleep(0.2)
    arrays = ArrayRecord({"w": Array(np.zeros(int(config["parameters"]), dtype=np.float32))})
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        messages = [
            Message(
                content=RecordDict({"arrays": arrays}),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in sorted(grid.get_node_ids())
        ]
        replies = _exchange(grid, messages, float(config["poll"]))
        if len(replies) != len(messages) or any(r.has_error() for r in replies):
            raise RuntimeError(f"the floor round lost replies: {replies}")
        seconds.append(time.perf_counter() - started)
    with open(str(config["out"]), "w", encoding="utf-8") as handle:
        json.dump({"round_seconds": seconds}, handle)
