"""Scenario steps as small functions over a guest connection.

Each step returns what happened (an :class:`Outcome`, a list of log lines)
instead of raising on an expected failure, so a scenario reads like its row
in SCENARIOS.md: ``assert remount(...) == EINVAL``.
"""

from __future__ import annotations

import errno as errno_mod
import re
import uuid
from dataclasses import dataclass
from typing import Protocol, Sequence

SYSCALL = "/usr/local/bin/ovl-syscall"
INCOMPAT_MSG = "overlay with incompat feature 'volatile' cannot be mounted"


class Runs(Protocol):
    def run(self, cmd, **kwargs): ...


@dataclass(frozen=True)
class Outcome:
    """The result of one syscall in the guest: OK or an errno."""

    errno: int           # 0 for success
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def name(self) -> str:
        return "OK" if self.ok else errno_mod.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.name == other
        if isinstance(other, Outcome):
            return self.errno == other.errno
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.errno)


OK = Outcome(0)
_ERRNO = re.compile(r"errno=(\d+)")


def parse_outcome(stdout: str, exit_status: int) -> Outcome:
    if exit_status == 0 and stdout.strip().endswith("ok"):
        return OK
    m = _ERRNO.search(stdout)
    if not m:
        raise RuntimeError(f"ovl-syscall gave no verdict (exit {exit_status}): {stdout.strip()!r}")
    return Outcome(int(m.group(1)), stdout.strip())


def syscall(g: Runs, *args: str) -> Outcome:
    res = g.run([SYSCALL, *args])
    return parse_outcome(res.stdout, res.exit_status)


def sh(g: Runs, cmd: Sequence[str] | str):
    """A setup step that must succeed."""
    return g.run(cmd, check=True)


# --- kernel log ----------------------------------------------------------------

def kmsg_mark(g: Runs, label: str) -> str:
    marker = f"ovl-harness-mark {label} {uuid.uuid4().hex[:8]}"
    g.run(["sh", "-c", 'echo "$1" > /dev/kmsg', "sh", marker], check=True)
    return marker


def kmsg_since(g: Runs, marker: str) -> list[str]:
    out = g.run(["dmesg"], check=True).stdout.splitlines()
    for i in range(len(out) - 1, -1, -1):
        if marker in out[i]:
            return out[i + 1:]
    return out


# --- filesystems and overlay ---------------------------------------------------

@dataclass(frozen=True)
class OverlayDirs:
    fs_mount: str = "/mnt/upperfs"
    target: str = "/mnt/ovl"

    @property
    def lower(self) -> str:
        return f"{self.fs_mount}/lower"

    @property
    def upper(self) -> str:
        return f"{self.fs_mount}/upper"

    @property
    def work(self) -> str:
        return f"{self.fs_mount}/work"

    @property
    def volatile_dir(self) -> str:
        return f"{self.work}/work/incompat/volatile"

    def options(self, volatile: bool) -> str:
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        return opts + (",volatile" if volatile else "")


def disk_by_serial(g: Runs, serial: str) -> str:
    script = ('for b in /sys/block/vd*; do [ "$(cat $b/serial 2>/dev/null)" = "$1" ] '
              '&& echo /dev/${b##*/} && exit 0; done; exit 1')
    return g.run(["sh", "-c", script, "sh", serial], check=True).stdout.strip()


def umount_all(g: Runs, dirs: OverlayDirs) -> None:
    for path in (dirs.target, dirs.fs_mount):
        g.run(["sh", "-c", 'while mountpoint -q "$1"; do umount "$1" || exit 1; done', "sh", path],
              check=True)


def fresh_upper(g: Runs, device: str, fstype: str, dirs: OverlayDirs) -> None:
    """mkfs a fresh upper filesystem on ``device`` and make the overlay dirs."""
    umount_all(g, dirs)
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}[fstype]
    sh(g, [*mkfs, device])
    sh(g, ["mkdir", "-p", dirs.fs_mount, dirs.target])
    sh(g, ["mount", "-t", fstype, device, dirs.fs_mount])
    sh(g, ["mkdir", "-p", dirs.lower, dirs.upper, dirs.work])
    sh(g, ["sh", "-c", 'echo lower > "$1/from-lower"', "sh", dirs.lower])


def mount_overlay(g: Runs, dirs: OverlayDirs, *, volatile: bool) -> Outcome:
    return syscall(g, "mount", "overlay", dirs.target, "overlay", dirs.options(volatile))


def umount_overlay(g: Runs, dirs: OverlayDirs) -> Outcome:
    return syscall(g, "umount", dirs.target)


def exists(g: Runs, path: str) -> bool:
    return g.run(["test", "-e", path]).exit_status == 0
