"""Reading a run directory's JSON files, each checked as it is read: a damaged or foreign
file stops the reader with one line naming it, never a traceback. Shared by the audit and
the report, and light to import (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpriv.errors import RunDirectoryError

__all__ = ["read_metrics", "read_run_json"]


def read_run_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """The JSON object in ``path``; {} when the file is optional and absent."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not required:
            return {}
        raise RunDirectoryError(
            f"'{path}' is missing: is this a finished fedpriv run directory?"
        ) from None
    except UnicodeDecodeError:
        raise RunDirectoryError(f"'{path}' is not text: the file is damaged") from None
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(
            f"'{path}' is damaged (not valid JSON at line {exc.lineno}, column {exc.colno}); "
            "was the run interrupted while writing it?"
        ) from None
    except OSError as exc:
        raise RunDirectoryError(f"'{path}' cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise RunDirectoryError(f"'{path}' does not hold a JSON object: the file is damaged")
    return data


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rounds, every line checked: a damaged line stops the audit before it
    spends time, and the report before it draws half a run."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirectoryError(f"'{path}' cannot be read: {exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunDirectoryError(f"'{path}' line {number} is damaged (not valid JSON)") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise RunDirectoryError(f"'{path}' line {number} is not a round's record")
        rows.append(row)
    return rows
