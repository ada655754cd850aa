"""Kill points for crash tests: the process SIGKILLs itself at a named point of the job flow.

`CONSENTRY_TEST_KILL_AT=point:N` kills the process the Nth time it passes `point` (N defaults
to 1; each process counts its own passes, so a restarted worker dies again at its Nth). Points:

    download  inside a download, a chunk written to the local file, the rest not yet
              (Nextcloud connector)
    fetch   an asset was downloaded, nothing analysed yet
    detect  faces detected and matched, nothing written
    write   the platform write is done, the state commit not yet (the worst moment: the
            platform already shows the verdict, Consentry's records and audit log do not)

Like CONSENTRY_TEST_KILL_AFTER of the erasure (plugin/erasure.py), but a real SIGKILL: no
`finally`, no atexit, no flushed buffer — what `kill -9` or the OOM killer does to a worker.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT_ENV = "CONSENTRY_TEST_KILL_AT"
POINTS = ("download", "fetch", "detect", "write")

_passes: Counter[str] = Counter()


def hit(point: str) -> None:
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
