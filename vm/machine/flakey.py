"""dm-flakey over a guest scratch disk, driven the way fstests' common/dmflakey does.

    with Flakey(guest, "/dev/vdc") as fl:
        sh(guest, ["mkfs.xfs", "-q", "-f", fl.device])
        fl.load(ERROR_WRITES)      # every write fails with EIO
        ...
        fl.load(NORMAL)

Tables (``SIZE`` from ``blockdev --getsz``, ``DEV`` the backing disk), as in
fstests:

- normal:        ``0 SIZE flakey DEV 0 180 0``
- drop_writes:   ``0 SIZE flakey DEV 0 0 180 1 drop_writes``
- error_writes:  ``0 SIZE flakey DEV 0 0 180 1 error_writes``

A table is switched with ``dmsetup suspend --nolockfs`` (no freeze: the
filesystem on top must not be synced by the switch), ``dmsetup load
--table`` and ``dmsetup resume``.  The guest has no udev, so after create
and remove ``dmsetup mknodes`` makes (or drops) ``/dev/mapper/NAME``; the
node is checked before anyone uses it.
"""

from __future__ import annotations

import re

from vm import errors

NORMAL = "normal"
DROP_WRITES = "drop_writes"
ERROR_WRITES = "error_writes"

TABLES = {
    NORMAL: "0 {size} flakey {dev} 0 180 0",
    DROP_WRITES: "0 {size} flakey {dev} 0 0 180 1 drop_writes",
    ERROR_WRITES: "0 {size} flakey {dev} 0 0 180 1 error_writes",
}

DEFAULT_NAME = "ovl-flakey"


def table(kind: str, size: int, backing: str) -> str:
    try:
        return TABLES[kind].format(size=size, dev=backing)
    except KeyError:
        raise ValueError(f"unknown dm-flakey table {kind!r} (use one of {', '.join(TABLES)})") from None


def mounts_on(mountinfo: str, device: str, devno: str | None = None) -> list[str]:
    """Mount points to unmount, last mounted first, so that ``device`` is free.

    Every mount of ``device`` (by source path or by ``major:minor``), every
    mount below one of them, and every overlay whose lower, upper or work
    directory lives on one of them.
    """
    entries = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        entries.append((fields[2], _unescape(fields[4]), rest[0], rest[1],
                        rest[2] if len(rest) > 2 else ""))
    roots = [t for dev, t, _fs, src, _o in entries if src == device or (devno and dev == devno)]

    def below(path: str) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    found = []
    for _dev, target, fstype, _src, opts in entries:
        layers: list[str] = []
        if fstype == "overlay":
            for opt in opts.split(","):
                key, _, value = opt.partition("=")
                if key in ("lowerdir", "upperdir", "workdir", "lowerdir+", "datadir+"):
                    layers += [_unescape(v) for v in value.split(":") if v]
        if below(target) or any(below(p) for p in layers):
            found.append(target)
    return list(reversed(found))


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


class Flakey:
    """A dm-flakey device ``/dev/mapper/NAME`` over ``backing`` in the guest."""

    def __init__(self, g, backing: str, name: str = DEFAULT_NAME) -> None:
        self.g = g
        self.backing = backing
        self.name = name
        self.size: int | None = None
        self.current: str | None = None

    @property
    def device(self) -> str:
        return f"/dev/mapper/{self.name}"

    def __repr__(self) -> str:
        return f"<Flakey {self.device} over {self.backing} table={self.current}>"

    # --- helpers ---------------------------------------------------------
    def _run(self, argv: list[str], what: str, fix: str = "see the guest's dmesg"):
        res = self.g.run(argv)
        if res.exit_status != 0:
            detail = (res.stderr or res.stdout).strip().splitlines()
            raise errors.FlakeyError(name=self.name, fix=fix,
                              what=f"`{' '.join(argv)}` exited {res.exit_status} while {what}"
                                   + (f": {detail[-1]}" if detail else ""))
        return res

    def table(self, kind: str) -> str:
        if self.size is None:
            self.size = self._sectors()
        return table(kind, self.size, self.backing)

    def _sectors(self) -> int:
        out = self._run(["blockdev", "--getsz", self.backing], "reading the size of the backing disk",
                        "check that the scratch disk exists in the guest").stdout.strip()
        try:
            size = int(out)
        except ValueError:
            raise errors.FlakeyError(name=self.name, what=f"blockdev --getsz {self.backing} printed {out!r}",
                              fix="check the scratch disk") from None
        if size <= 0:
            raise errors.FlakeyError(name=self.name, what=f"{self.backing} has {size} sectors",
                              fix="check the scratch disk")
        return size

    def exists(self) -> bool:
        return self.g.run(["dmsetup", "info", self.name]).exit_status == 0

    def _node_present(self) -> bool:
        return self.g.run(["test", "-b", self.device]).exit_status == 0

    def _ensure_node(self) -> None:
        if self._node_present():
            return
        self._run(["dmsetup", "mknodes", self.name], "making the device node (no udev in the guest)")
        if not self._node_present():
            raise errors.FlakeyError(name=self.name, what=f"{self.device} did not appear after dmsetup mknodes",
                              fix="check devtmpfs and /dev/mapper in the guest")

    # --- lifecycle -------------------------------------------------------
    def create(self, kind: str = NORMAL) -> "Flakey":
        """``dmsetup create NAME --table TABLE`` and make sure the node exists."""
        self._run(["dmsetup", "create", self.name, "--table", self.table(kind)], "creating it",
                  "is dm-flakey in the kernel, and the backing disk free (not mounted)?")
        self.current = kind
        self._ensure_node()
        return self

    def load(self, kind: str) -> None:
        """Switch the table: suspend --nolockfs, load, resume (fstests' _load_flakey_table)."""
        new = self.table(kind)
        self._run(["dmsetup", "suspend", "--nolockfs", self.name], f"suspending to load {kind}")
        try:
            self._run(["dmsetup", "load", self.name, "--table", new], f"loading the {kind} table")
        except errors.FlakeyError:
            # a suspended device would hang every later I/O: resume the old table
            self.g.run(["dmsetup", "resume", self.name])
            raise
        self._run(["dmsetup", "resume", self.name], f"resuming with the {kind} table")
        self.current = kind

    def status(self) -> str:
        return self._run(["dmsetup", "table", self.name], "reading its table").stdout.strip()

    def unmount_all(self) -> list[str]:
        """Unmount whatever is mounted on the device, and what is mounted below that."""
        info = self.g.run(["cat", "/proc/self/mountinfo"]).stdout
        devno = self.g.run(["sh", "-c", 'mountpoint -x "$1" 2>/dev/null', "sh", self.device]).stdout.strip()
        targets = mounts_on(info, self.device, devno or None)
        for target in targets:
            self._run(["umount", target], f"unmounting {target}",
                      "something in the guest keeps it busy")
        return targets

    def remove(self) -> None:
        """Resume (a suspended device would hang umount), unmount, remove, drop the node."""
        if not self.exists():
            self.g.run(["dmsetup", "mknodes", self.name])
            return
        self.g.run(["dmsetup", "resume", self.name])
        self.unmount_all()
        self._run(["dmsetup", "remove", "--retry", self.name], "removing it",
                  "something still holds the device open")
        self.g.run(["dmsetup", "mknodes", self.name])
        self.current = None

    def __enter__(self) -> "Flakey":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()

