"""A site's warm worker: one long-lived process that serves the SuperNode's ClientApp processes.

Flower's SuperNode starts a new ClientApp process for every message. Each would import
PyTorch, read and check the site's file and rebuild its model before doing a second of
work; on a small model that is most of a round. At a real site (node config ``data-path``)
the ClientApp process therefore stays thin: it imports Flower and this module only, hands
the message and the node's context to a worker process over a Unix socket, and returns the
worker's reply and context. The worker imports PyTorch once, keeps the site's checked data
in memory (read again when the file changes on disk) and runs exactly the handlers a
ClientApp process would run in-process (:mod:`fedpriv.client.handlers`).

What it may and may not do:

- The socket lives in a directory only the site's user can enter (0700, checked), and the
  worker serves only connections from that same user (``SO_PEERCRED``). Any such process can
  already read the site's data, ledger and keys; the socket gives it nothing more, and
  nothing listens on the network.
- Nothing is kept that the in-process path would not keep: the ledger is read and written
  on disk by every request, and Flower's context state goes back with every reply.
- One request at a time; a worker started for another node configuration, another Python
  or another copy of fedpriv's code is another worker (the socket's name is a digest of all
  three), so an upgrade never talks to stale code.
- It stops by itself: when the SuperNode that started it is gone, or after
  ``warm-worker-idle`` seconds without a request (default 600).
- If it cannot start, the ClientApp process runs the message itself (and says so in its
  log). If it dies mid-request, the message fails as a crashed ClientApp would: the
  ledger's reservation stays spent, nothing is retried behind the server's back.

A site may start it with its SuperNode (``fedpriv site warm``, the kit's entrypoint does), so
that the first round does not wait for its imports.

A site turns it off with ``warm-worker = false`` in its node config (or
``FEDPRIV_WARM_WORKER=0`` in the SuperNode's environment).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "WarmWorkerError",
    "enabled",
    "forward",
    "prestart",
    "serve",
    "settings",
    "socket_path",
]

logger = logging.getLogger(__name__)

#: node config keys (a site's settings file)
WARM_WORKER = "warm-worker"
WARM_WORKER_IDLE = "warm-worker-idle"
DATA_PATH = "data-path"
ENVIRONMENT = "FEDPRIV_WARM_WORKER"
DEFAULT_IDLE_SECONDS = 600.0
#: how long a ClientApp process waits for a fresh worker to listen (it imports PyTorch)
START_SECONDS = 180.0
_HEADER = struct.Struct("!Q")
_MAX_FRAME = 4 << 30
_MAX_SOCKET_PATH = 107
_PACKAGE = Path(__file__).resolve().parents[1]


class WarmWorkerError(RuntimeError):
    """The worker failed or went away while serving a message."""


def settings(node_config: Mapping[str, Any]) -> tuple[bool, float]:
    """A site's ``warm-worker`` (on unless false) and ``warm-worker-idle`` (seconds > 0);
    ConfigError naming the key."""
    from fedpriv.errors import ConfigError

    raw = node_config.get(WARM_WORKER, True)
    if isinstance(raw, str):
        if raw.strip().lower() not in ("true", "false"):
            raise ConfigError(f"node config: '{WARM_WORKER}' must be true or false ({raw!r})")
        raw = raw.strip().lower() == "true"
    if not isinstance(raw, bool | int):
        raise ConfigError(f"node config: '{WARM_WORKER}' must be true or false ({raw!r})")
    idle = node_config.get(WARM_WORKER_IDLE, DEFAULT_IDLE_SECONDS)
    try:
        seconds = float(idle)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(
            f"node config: '{WARM_WORKER_IDLE}' must be a number of seconds > 0 ({idle!r})"
        )
    return bool(raw), seconds


def enabled(node_config: Mapping[str, Any]) -> bool:
    """A real site's messages go to its warm worker unless it turned that off."""
    if DATA_PATH not in node_config:  # a simulated hospital: Ray's workers are warm already
        return False
    if os.environ.get(ENVIRONMENT, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return settings(node_config)[0]


def _code_digest(package: Path | None = None) -> str:
    """Which fedpriv this is, by content: every module's path in the package and its bytes.
    Edited or upgraded code gets another worker; the same code from two places (installed at
    the site, and carried in the run's app bundle, which Flower unpacks elsewhere) is one, so
    a worker started with the SuperNode (``fedpriv site warm``) serves the bundle's messages."""
    package = _PACKAGE if package is None else package
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _runtime_dir() -> Path:
    """A directory only this user can enter: $XDG_RUNTIME_DIR or /tmp/fedpriv-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    directory = Path(base) / f"fedpriv-warm-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WarmWorkerError(
            f"{directory} must be a directory owned by this user with mode 0700; "
            "not using a warm worker"
        )
    return directory


def socket_path(node_config: Mapping[str, Any]) -> Path:
    """The worker's socket for this node configuration, Python and copy of fedpriv."""
    key = json.dumps(
        {
            "node": {str(k): str(v) for k, v in node_config.items()},
            "python": sys.executable,
            "code": _code_digest(),
        },
        sort_keys=True,
    )
    # Unix socket paths are short (108 bytes): a digest, not the configuration
    path = _runtime_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise WarmWorkerError(f"{path} is too long for a Unix socket; set XDG_RUNTIME_DIR shorter")
    return path


# ---- framing -----------------------------------------------------------------------------


def _send(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(_HEADER.pack(len(frame)) + frame)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks += chunk
    return bytes(chunks)


def _receive(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_receive_exactly(sock, _HEADER.size))
    if size > _MAX_FRAME:
        raise ConnectionError(f"a frame of {size} bytes is over the limit")
    return _receive_exactly(sock, size)


# ---- the ClientApp process's side --------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def prestart(node_config: Mapping[str, Any], watch_pid: int) -> Path:
    """Start the worker for ``node_config`` now, before its SuperNode sends a message (its
    imports then cost the first round nothing); it stops when ``watch_pid`` (the SuperNode)
    is gone, or when idle. Returns its socket; a worker that already listens is kept."""
    path = socket_path(node_config)
    _start_worker(path, node_config, watch_pid=watch_pid).close()
    return path


def _start_worker(
    path: Path, node_config: Mapping[str, Any], *, watch_pid: int | None = None
) -> socket.socket:
    """Connect to the worker for ``path``, starting it first if none listens (one starter at
    a time: a lock file beside the socket). It watches ``watch_pid``: by default this
    process's parent, the SuperNode that starts ClientApp processes."""
    sock = _connect(path)
    if sock is not None:
        return sock
    lock_path = path.with_suffix(".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)  # another ClientApp process may have started it meanwhile
        if sock is not None:
            return sock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a worker that died left its socket behind
        env = dict(os.environ)
        # the same fedpriv as this process (Flower may load it from an installed FAB)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_PACKAGE.parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        )
        log = path.with_suffix(".log").open("ab")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedpriv.client.warm",
                "--socket",
                str(path),
                "--watch-pid",
                str(os.getppid() if watch_pid is None else watch_pid),
                "--idle",
                str(settings(node_config)[1]),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # outlives this ClientApp process, not its SuperNode
            close_fds=True,
        )
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            if process.poll() is not None:
                raise WarmWorkerError(
                    f"the warm worker exited ({process.returncode}) before listening: see "
                    f"{path.with_suffix('.log')}"
                )
            time.sleep(0.05)
        process.kill()
        raise WarmWorkerError(f"the warm worker did not listen within {START_SECONDS:.0f} s")


def forward(message: Any, context: Any) -> Any:
    """Serve ``message`` in the site's warm worker; returns the reply and updates
    ``context.state`` as the in-process handlers would. Returns None when no worker can be
    used (the caller then runs the message itself)."""
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    try:
        path = socket_path(context.node_config)
        sock = _start_worker(path, context.node_config)
    except (OSError, WarmWorkerError) as exc:
        logger.warning("fedpriv: no warm worker (%s); serving this message in-process", exc)
        return None
    with sock:
        try:
            _send(
                sock,
                message_to_proto(message).SerializeToString(),
                context_to_proto(context).SerializeToString(),
            )
            status = _receive(sock)
            if status != b"ok":
                raise WarmWorkerError(status.decode("utf-8", "replace"))
            reply = message_from_proto(ProtoMessage.FromString(_receive(sock)))
            served = context_from_proto(ProtoContext.FromString(_receive(sock)))
        except (OSError, ConnectionError) as exc:
            raise WarmWorkerError(f"the warm worker went away mid-message: {exc}") from exc
    context.state = served.state
    return reply


# ---- the worker --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid <= 1:
        return True  # nothing to watch
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _serve_one(conn: socket.socket, app: Any) -> None:
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    if not conn.recv(1, socket.MSG_PEEK):
        return  # closed before a byte: a check that the worker listens (`fedpriv site warm`)
    message = message_from_proto(ProtoMessage.FromString(_receive(conn)))
    context = context_from_proto(ProtoContext.FromString(_receive(conn)))
    started = time.perf_counter()
    try:
        reply = app(message, context)
    except Exception as exc:  # the ClientApp process raises it, as an in-process app would
        logger.error("message failed:\n%s", traceback.format_exc())
        _send(conn, f"{type(exc).__name__}: {exc}".encode())
        return
    logger.info(
        "served a %s message in %.3f s",
        message.metadata.message_type,
        time.perf_counter() - started,
    )
    _send(
        conn,
        b"ok",
        message_to_proto(reply).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def serve(path: Path, watch_pid: int, idle_seconds: float) -> int:
    """Listen on ``path`` until ``watch_pid`` is gone or nothing came for ``idle_seconds``."""
    from fedpriv.client.handlers import local_app  # the heavy imports, once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file: 0600
    try:
        # the starter holds the lock and removed any stale socket; a connect before listen()
        # is refused and simply retried
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    own = path.stat().st_ino
    listener.listen(8)
    listener.settimeout(1.0)
    logger.info("warm worker %d listening on %s", os.getpid(), path)
    last = time.monotonic()
    try:
        while _alive(watch_pid) and time.monotonic() - last < idle_seconds:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if _peer_uid(conn) != os.getuid():
                    logger.warning("refused a connection from another user")
                    continue
                try:
                    _serve_one(conn, local_app)
                except (OSError, ConnectionError) as exc:
                    logger.warning("a ClientApp process went away: %s", exc)
            last = time.monotonic()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == own:  # not a newer worker's socket
                path.unlink()
    logger.info("warm worker %d stops", os.getpid())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpriv.client.warm")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--watch-pid", type=int, default=0)
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE_SECONDS)
    args = parser.parse_args(argv)
    return serve(args.socket, args.watch_pid, args.idle)


if __name__ == "__main__":
    sys.exit(main())
