"""JSON Lines files: task files and `metrics.jsonl` are read (and written) here, with errors that name the
file and the line; and writing any result file so that a reader never sees half of it.

A process killed inside a write leaves at most one torn line at the end of a log (no newline, not valid JSON).
Readers of logs (`tolerate_torn_tail=True`: report, compare, resume) drop it with one warning naming the file;
the next append cuts it off first, so a resumed run never writes after half a line."""

from __future__ import annotations

import json
import os
import warnings

from .faults import kill_point


def _torn_tail_warning(path: str) -> None:
    warnings.warn(f"{path}: the last line is incomplete (the process was killed while writing it); dropped")


def read_jsonl(path: str, what: str = "jsonl file", *, tolerate_torn_tail: bool = False):
    """(line number, object) for every non-empty line; a missing file, bad JSON or a non-object line is an
    error that names the file and the line. `tolerate_torn_tail`: a last line without its newline that is not
    valid JSON (a write cut by a kill) is dropped with a warning instead."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path) as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and lineno == len(lines) and not line.endswith("\n"):
                _torn_tail_warning(path)
                return
            raise ValueError(f"{path}, row {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {lineno}: not a JSON object")
        yield lineno, row


def _cut_torn_tail(path: str) -> None:
    """Remove a last line that has no newline (a torn write), so that appending starts on a line of its own."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    _torn_tail_warning(path)


def append_jsonl(path: str, row: dict) -> None:
    """Append one JSON object as a line (floats from tensors and numpy are written as numbers)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.isfile(path):
        _cut_torn_tail(path)
    line = json.dumps(row, default=float) + "\n"
    with open(path, "a") as f:
        def torn_write():  # fault injection: the process dies with half the line on disk
            f.write(line[: len(line) // 2])
            f.flush()
        kill_point("log_write", torn_write)
        f.write(line)
        f.flush()


def atomic_replace(path: str, write) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it over `path`: a reader (or a kill) sees the old
    file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_replace(path, write)


def atomic_write_json(path: str, obj, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}))


def truncate_log_to_step(path: str, step: int) -> int:
    """Keep the rows of a metrics log logged at or before `step` (a run resumed from the checkpoint of `step` logs
    the later ones again, so each step appears once); a torn last line goes too. Atomic. Returns rows dropped."""
    if not os.path.isfile(path):
        return 0
    rows = [row for _, row in read_jsonl(path, "metrics file", tolerate_torn_tail=True)]
    # the summary row a finished train() logs ("train_loss") at `step` belongs to the run being continued: it goes
    kept = [row for row in rows if row.get("step", 0) < step or row.get("step", 0) == step and "train_loss" not in row]
    atomic_write_text(path, "".join(json.dumps(row, default=float) + "\n" for row in kept))
    return len(rows) - len(kept)
