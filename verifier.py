"""math-verify under a hard wall-clock limit, in persistent child processes (reward.py's grader uses it).

math-verify's own timeout uses ``signal.alarm`` (main thread only, and it cannot interrupt long C-level
big-integer arithmetic). We turn it off (``parsing_timeout=None``, ``timeout_seconds=None``) and run
math-verify in persistent child processes (``python verifier.py --verifier-child``, started with
``subprocess`` so that this also works inside daemonic pool workers, threads and spawn workers), talking
JSON lines over pipes. A comparison waits at most ``timeout`` seconds (wall clock, ``select`` on the
pipe); on overrun the child is killed, a replacement starts in the background, and the comparison is
False. Child start-up (importing sympy, ~0.5-2 s) is not counted against ``timeout`` (it has its own
``_STARTUP_TIMEOUT``; ``warmup()`` starts children ahead). Children are capped at 4 GiB of address space,
exit when their parent's pipe closes, and results are cached per (gold, answer, timeout). Nothing from
the model is ever passed to ``eval``/``exec``/``sympify``; sympy parsing happens only inside math-verify
in the child. POSIX only (``select`` on pipes); the child is ``python -P`` (Python >= 3.11).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from functools import lru_cache

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT = 60.0  # a child's start-up (importing sympy and math-verify), not counted in a comparison
_GUARD_RTOL = 1e-5  # constants equal for math-verify must agree this closely when a float is involved


class GraderUnavailable(RuntimeError):
    """The math-verify child could not start (e.g. math-verify not installed)."""


class _Verifier:
    """One persistent child process running math-verify; killed when a comparison overruns."""

    def __init__(self) -> None:  # returns at once: the child imports math-verify in the background
        self.owner = os.getpid()
        self.buf = b""
        self.ready = False
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-u", os.path.abspath(__file__), "--verifier-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def _readline(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("math-verify child timed out")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("math-verify child exited")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.strip()

    def _wait_ready(self) -> None:
        if self.ready:
            return
        try:
            line = self._readline(time.monotonic() + _STARTUP_TIMEOUT)
        except (TimeoutError, EOFError) as e:
            line = repr(e).encode()
        if line != b"ready":
            self.kill()
            raise GraderUnavailable(
                f"math-verify child did not start ({line[:200]!r}); is math-verify installed?"
            )
        self.ready = True

    def compare(self, gold: str, pred: str, timeout: float) -> bool:
        self._wait_ready()  # start-up is not counted against `timeout`
        self.proc.stdin.write(json.dumps({"g": gold, "p": pred}).encode() + b"\n")
        self.proc.stdin.flush()
        return json.loads(self._readline(time.monotonic() + max(timeout, 0.01)))["ok"] is True

    def kill(self) -> None:
        if self.owner != os.getpid():
            return  # inherited through fork: the parent's child, not ours
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


_idle: list[_Verifier] = []
_idle_lock = threading.Lock()
_MAX_IDLE = 8


def _reset_after_fork() -> None:
    global _idle_lock
    _idle_lock = threading.Lock()
    _idle.clear()  # the parent's children are not ours to use or kill


os.register_at_fork(after_in_child=_reset_after_fork)


@atexit.register
def _kill_idle() -> None:
    with _idle_lock:
        for v in _idle:
            v.kill()
        _idle.clear()


def _put_idle(v: _Verifier) -> None:
    with _idle_lock:
        if len(_idle) < _MAX_IDLE:
            _idle.append(v)
            return
    v.kill()


def warmup(n: int = 1, wait: bool = False) -> None:
    """Have at least `n` idle math-verify children, started in the background (a pool worker
    initializer), or ready when `wait`; optional, grade() starts children as it needs them."""
    with _idle_lock:
        for v in [v for v in _idle if v.owner != os.getpid() or v.proc.poll() is not None]:
            v.kill()  # a no-op for another process's child; closes the pipes of a dead one
            _idle.remove(v)
        fresh = [_Verifier() for _ in range(n - len(_idle))]
        _idle.extend(fresh)
        pending = list(_idle) if wait else []
    for v in pending:
        v._wait_ready()


@lru_cache(maxsize=8192)
def equal(gold: str, pred: str, timeout: float) -> bool:
    with _idle_lock:
        v = _idle.pop() if _idle else None
    if v is None or v.owner != os.getpid() or v.proc.poll() is not None:  # none idle, or it died idle
        v = _Verifier()
    try:
        ok = v.compare(gold, pred, timeout)
    except (TimeoutError, EOFError, OSError, ValueError, KeyError):
        logger.debug("math-verify comparison failed or timed out (%.1f s)", timeout)
        v.kill()
        _put_idle(_Verifier())  # the replacement starts up while the caller carries on
        return False
    _put_idle(v)
    return ok


def _verifier_child_main() -> None:
    """Child loop: one JSON request {"g", "p"} per line on stdin, one {"ok"} per line on stdout."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    logging.disable(logging.CRITICAL)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    import sympy
    from math_verify import parse, verify

    def guard(g: object, p: object) -> bool:
        # math-verify rounds to 6 decimal places and chops tiny differences (1/3^61 == 1/3^60 for it):
        # constants must agree to 1e-60 relative when both are exact, to _GUARD_RTOL when a float is involved
        if not (isinstance(g, sympy.Expr) and isinstance(p, sympy.Expr) and g.is_number and p.is_number):
            return True
        if g == p:
            return True
        exact = not (g.atoms(sympy.Float) or p.atoms(sympy.Float))
        digits, rtol = (80, sympy.Float("1e-60", 80)) if exact else (30, sympy.Float(_GUARD_RTOL, 30))
        a, b = sympy.N(g, digits), sympy.N(p, digits)
        try:
            return bool(abs(a - b) <= rtol * max(abs(a), abs(b)))
        except TypeError:  # not comparable (unevaluated): keep math-verify's verdict
            return True

    def equal(gold: str, pred: str) -> bool:
        g = parse(gold, parsing_timeout=None)
        p = parse(pred, parsing_timeout=None)
        if not g or not p or not verify(g, p, allow_set_relation_comp=True, timeout_seconds=None):
            return False
        return guard(g[0], p[0])

    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            ok = bool(equal(req["g"], req["p"]))
        except Exception:  # any failure (RecursionError, MemoryError, ...) means "not equal"
            ok = False
        proto.write(json.dumps({"ok": ok}) + "\n")
        proto.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--verifier-child"]:
    _verifier_child_main()
