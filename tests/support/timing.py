"""The one clock the time-bound attack tests read (tests/security/test_linear_parsers.py,
test_schema_patterns.py): the best of a few runs of a call, in the CPU time of the calling
thread, with the line tracer off.

CPU time of this thread, not wall time: the suite shares two cores with its own servers
and xdist workers, and a parse preempted halfway read as two to three times its cost under
a load of 10; the thread's CPU time does not count the time it waited.

Those tests assert how a parse's time grows with its input, the one promise that is about
time. The suite runs under coverage, whose tracer slows Python code two to three times;
it is switched off for the timed runs only (the code still runs traced elsewhere), so the
figure is the parser's and not the tracer's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def best_seconds(call: Callable[[], object], runs: int) -> float:
    """The shortest of ``runs`` CPU times of ``call()`` on this thread, untraced."""
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        best = float("inf")
        for _ in range(runs):
            start = time.thread_time()
            call()
            best = min(best, time.thread_time() - start)
        return best
    finally:
        sys.settrace(tracer)
