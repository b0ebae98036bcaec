"""The hospital's Flower ClientApp (``clientapp`` in pyproject.toml).

Light on purpose: Flower starts one process per message at a real site, and this module is
all such a process imports besides Flower. A real site's messages go to its warm worker
(:mod:`fedpriv.client.warm`); a simulated hospital's, or a site that turned the worker off,
run here (:mod:`fedpriv.client.handlers`, imported only then).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpriv.client import warm

__all__ = ["app"]

app = ClientApp()


def _serve(message: Message, context: Context) -> Message:
    if warm.enabled(context.node_config):
        reply = warm.forward(message, context)
        if reply is not None:
            return reply
    from fedpriv.client.handlers import local_app

    reply = local_app(message, context)
    assert isinstance(reply, Message)
    return reply


@app.train()
def train(message: Message, context: Context) -> Message:
    return _serve(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _serve(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    return _serve(message, context)
