"""Reading the guest's serial console.

QEMU writes the console to a file.  :func:`follow` reads it as a generator of
lines, teeing them to an optional sink, and enforces a deadline (kunit.py
style); :func:`classify` and :func:`find_splats` are pure functions tested
against saved logs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vm import errors

READY_MARKER = "ovl-init: guest ready"


class Event(Enum):
    NONE = "none"
    KERNEL_START = "kernel start"
    READY = "ready"
    PANIC = "panic"
    INIT_FAILED = "init failed"


_PANIC = re.compile(r"Kernel panic - not syncing|end Kernel panic")
_INIT_FAILED = re.compile(r"(Run|Requested init) \S+ failed|No working init found")
_START = re.compile(r"Linux version \d")

#: Reports that fail a scenario whatever the syscalls returned.
SPLAT_PATTERNS = {
    "WARNING": re.compile(r"WARNING: (CPU: \d+ PID: \d+ at |.*possible|.*suspicious|.*inconsistent)|------------\[ cut here \]------------"),
    "BUG": re.compile(r"\bBUG: |kernel BUG at "),
    "Oops": re.compile(r"\bOops: |general protection fault"),
    "lockdep": re.compile(r"possible circular locking dependency|possible recursive locking|"
                          r"inconsistent lock state|suspicious RCU usage|"
                          r"INFO: possible irq lock inversion|lock held when returning"),
    "KASAN": re.compile(r"BUG: KASAN: |KASAN: "),
    "UBSAN": re.compile(r"UBSAN: "),
    "hung task": re.compile(r"INFO: task .* blocked for more than"),
    "panic": _PANIC,
}


def classify(line: str) -> Event:
    if READY_MARKER in line:
        return Event.READY
    if _PANIC.search(line):
        return Event.PANIC
    if _INIT_FAILED.search(line):
        return Event.INIT_FAILED
    if _START.search(line):
        return Event.KERNEL_START
    return Event.NONE


@dataclass(frozen=True)
class Splat:
    kind: str
    line: str
    context: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind}: {self.line.strip()}"


def find_splats(lines: Iterable[str], context: int = 25) -> list[Splat]:
    """Every kernel WARNING/BUG/Oops/lockdep/KASAN report in ``lines``."""
    lines = list(lines)
    found: list[Splat] = []
    skip_until = -1
    for i, line in enumerate(lines):
        if i <= skip_until:
            continue
        for kind, pattern in SPLAT_PATTERNS.items():
            if pattern.search(line):
                found.append(Splat(kind, line, tuple(lines[max(0, i - 2): i + context])))
                skip_until = i + context   # one report, not one per line of it
                break
    return found


def follow(path: Path, *, deadline: float, alive: Callable[[], bool] = lambda: True,
           sink: Callable[[str], None] | None = None, start: int = 0,
           poll: float = 0.2) -> Iterator[str]:
    """Yield lines appended to ``path`` from byte ``start`` on.

    Stops when ``alive()`` turns false (after draining what is left), raises
    :class:`ConsoleTimeout` when ``deadline`` (a ``time.monotonic`` value)
    passes.  Incomplete trailing lines are held back until they end.
    """
    offset, pending = start, ""
    while True:
        still_alive = alive()
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            pending += chunk.decode(errors="replace").replace("\r", "")
            *complete, pending = pending.split("\n")
            for line in complete:
                if sink:
                    sink(line)
                yield line
            continue
        if not still_alive:
            if pending:
                if sink:
                    sink(pending)
                yield pending
            return
        if time.monotonic() > deadline:
            raise errors.ConsoleTimeout(path=path)
        time.sleep(poll)


def last_lines(path: Path, count: int = 15) -> list[str]:
    try:
        text = path.read_text(errors="replace").replace("\r", "")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-count:]
