"""Crash points for the kill-and-resume tests.

``SOFTPROMPT_CRASH_AT=NAME:N`` makes the process SIGKILL itself the N-th time it reaches the
crash point NAME (``step``: after backward, before the optimizer step; ``checkpoint``: half
way through writing a checkpoint; ``write``: a file written but not yet renamed into place).
Unset (always, outside tests), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("SOFTPROMPT_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
