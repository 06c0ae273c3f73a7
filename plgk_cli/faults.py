"""Fault injection for the resume tests, inert unless PLGK_FAULT is set.

PLGK_FAULT=POINT:K[:HOW] acts right after the K-th time the process passes POINT
(``after_commit``: a replay progress commit; ``after_checkpoint``: a training checkpoint), HOW
being KILL (SIGKILL: no cleanup, like a power cut; the default), TERM or INT (a signal the command
handles) or CRASH (an unexpected exception).
"""

from __future__ import annotations

import os
import signal


def fault_hook(point: str) -> None:
    spec = os.environ.get("PLGK_FAULT", "").split(":")
    if spec[0] != point:
        return
    count = int(os.environ.get("PLGK_FAULT_COUNT", "0")) + 1
    os.environ["PLGK_FAULT_COUNT"] = str(count)
    if count != int(spec[1]):
        return
    how = spec[2] if len(spec) > 2 else "KILL"
    if how == "CRASH":
        raise RuntimeError("injected crash (PLGK_FAULT)")
    os.kill(os.getpid(), getattr(signal, "SIG" + how))
