"""Reading the JSON files the study, training loop, plots and benchmarks write.

A file cut short by a crash or edited by hand must not surface as a bare
`json.JSONDecodeError` ("Unterminated string ...") that names no file: every error
here is a `ValueError` that names the path, the position and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _corrupt(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"cannot read {str(path)!r}: {reason}; the file is corrupted (a crash while "
        "writing, or an edit): repair or delete it"
    )


def read_json(path: str | Path, *, kind: type = dict) -> Any:
    """The JSON value in `path`, which must be a `kind` (a JSON object by default).

    Raises:
      ValueError: naming `path` when it is not UTF-8 JSON of that kind.
      FileNotFoundError: when `path` does not exist.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise _corrupt(path, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise _corrupt(path, f"invalid JSON: {error}") from None
    if not isinstance(value, kind):
        raise _corrupt(path, f"expected a JSON {_json_name(kind)}, got {type(value).__name__}")
    return value


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per non-blank line.

    Raises:
      ValueError: naming `path` and the line number of the first line that is not a
        JSON object.
    """
    path = Path(path)
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise _corrupt(path, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _corrupt(path, f"line {number} is not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise _corrupt(path, f"line {number} is not a JSON object")
        records.append(record)
    return records


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array"}.get(kind, kind.__name__)
