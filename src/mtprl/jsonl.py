"""JSON Lines files: task files and `metrics.jsonl` are read (and written) here, with errors that name the
file and the line."""

from __future__ import annotations

import json
import os


def read_jsonl(path: str, what: str = "jsonl file"):
    """(line number, object) for every non-empty line; a missing file, bad JSON or a non-object line is an
    error that names the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, row {lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}, row {lineno}: not a JSON object")
            yield lineno, row


def append_jsonl(path: str, row: dict) -> None:
    """Append one JSON object as a line (floats from tensors and numpy are written as numbers)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
