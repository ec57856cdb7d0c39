"""Deterministic fault injection for the crash-consistency tests: `MTPRL_KILL_AT=<point>:<n>` makes the process
SIGKILL itself the n-th time (1-based) it reaches the named point. Without the variable every call is a no-op.

Points: `train_step` (after an optimizer step, before its logging and checkpoint), `checkpoint_save` (inside a
checkpoint save, after the main model's weights and before the heads and trainer state), `periodic_eval` (inside
a periodic evaluation, before its row is logged), `final_eval` (inside the final evaluation, before eval.json),
`log_write` (inside a metrics.jsonl append: half the line is on disk)."""

from __future__ import annotations

import os
import signal

POINTS = ("train_step", "checkpoint_save", "periodic_eval", "final_eval", "log_write")
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("MTPRL_KILL_AT")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS or not count.isdigit():
        raise ValueError(f"MTPRL_KILL_AT must be <point>:<n> with point one of {', '.join(POINTS)}, got {spec!r}")
    return name, int(count)


def kill_point(name: str, before_kill=None) -> None:
    """SIGKILL this process if MTPRL_KILL_AT names this point and this is its n-th visit; `before_kill()` runs
    first (e.g. to leave half a line on disk)."""
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == target[1]:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)
