"""A simulation's datasets, loaded once and handed to its worker processes.

In a simulation the server process reads and checks the dataset file before anything
starts, and then every Ray worker (a simulated hospital's process) read and parsed the same
file again on its first message: a 200,000-row CSV costs each of them about 4 s of CPU, at
the very moment all of them also import PyTorch (start-up, issue 14).

:func:`shared_datasets` (the server process, for the duration of one simulation) writes the
datasets it loaded into a private directory in memory (``/dev/shm`` where there is one, else
the temporary directory: 0700, owned by this user) and names it in the environment, which
Ray's workers inherit; :func:`read` (a worker) takes a dataset from there when it was loaded
with the same arguments. All of the run's processes then use the one snapshot the server
split and checked, even if the file changes on disk meanwhile. The directory is removed when
the simulation ends.

What it may and may not do: the copy holds what the file holds, for the user who can read
the file already, in a directory only that user can enter (checked, with the file's owner,
before anything is read); a process that could write there could already change the file.
Deployment never uses it (no variable, no directory): a real site's worker reads its own file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["ENV", "read", "shared_datasets"]

logger = logging.getLogger(__name__)

#: names the directory a simulation's worker processes read datasets from
ENV = "FEDPRIV_SIMULATION_DATA"
_SUFFIX = ".dataset"


def key(arguments: Iterable[Any]) -> str:
    """The file name a dataset loaded with these arguments has (a digest of them)."""
    text = json.dumps([str(a) for a in arguments])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32] + _SUFFIX


def _private(path: Path, *, directory: bool) -> bool:
    """Owned by this user, not a link, and (a directory) open to nobody else."""
    try:
        info = path.lstat()
    except OSError:
        return False
    if info.st_uid != os.getuid():
        return False
    if directory:
        return stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o077
    return stat.S_ISREG(info.st_mode) and not info.st_mode & 0o022


def read(arguments: Iterable[Any]) -> Any | None:
    """The dataset the simulation's server loaded with ``arguments``, or None (not a
    simulation, another dataset, or a directory that is not this user's alone)."""
    named = os.environ.get(ENV)
    if not named:
        return None
    directory = Path(named)
    path = directory / key(arguments)
    if not (_private(directory, directory=True) and _private(path, directory=False)):
        return None
    try:
        with path.open("rb") as handle:
            return pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        logger.debug("the simulation's copy of a dataset could not be read: %s", exc)
        return None


def _base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@contextlib.contextmanager
def shared_datasets(datasets: dict[tuple[Any, ...], Any]) -> Iterator[Path | None]:
    """Within the block, this process's children (Ray's workers) find ``datasets`` (load
    arguments -> dataset) through :data:`ENV`; yields the directory, or None if nothing
    could be written (then every worker reads its file, as before)."""
    if not datasets or os.environ.get(ENV):
        yield None  # nothing to share, or an outer simulation already shares
        return
    directory: Path | None = None
    try:
        directory = Path(tempfile.mkdtemp(prefix="fedpriv-data-", dir=_base()))
        for arguments, dataset in datasets.items():
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            with os.fdopen(os.open(directory / key(arguments), flags, 0o600), "wb") as handle:
                pickle.dump(dataset, handle, protocol=pickle.HIGHEST_PROTOCOL)
    except (OSError, pickle.PicklingError) as exc:
        logger.info("the workers will read the dataset file themselves: %s", exc)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        yield None
        return
    os.environ[ENV] = str(directory)
    try:
        yield directory
    finally:
        os.environ.pop(ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
