"""Scenario steps as small functions over a guest connection.

Each step returns what happened (an :class:`Outcome`, a list of log lines)
instead of raising on an expected failure, so a scenario reads like its row
in SCENARIOS.md: ``assert remount(...) == EINVAL``.
"""

from __future__ import annotations

import base64
import errno as errno_mod
import json
import re
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from vm import errors

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
        raise errors.GuestCommandFailed(cmd="ovl-syscall", rc=exit_status,
                                        detail=f" with no verdict: {stdout.strip()!r}",
                                        fix="rebuild the guest image (`invoke image`)")
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
    #: where a second overlay over the same dirs is tried while the first is mounted
    second_target: str = "/mnt/ovl2"

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
    def work_dir(self) -> str:
        """The ``work`` directory overlayfs makes (and, with the series, keeps) in workdir."""
        return f"{self.work}/work"

    @property
    def volatile_dir(self) -> str:
        return f"{self.work_dir}/incompat/volatile"

    def options(self, volatile: bool) -> str:
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        return opts + (",volatile" if volatile else "")


def disk_by_serial(g: Runs, serial: str) -> str:
    script = ('for b in /sys/block/vd*; do [ "$(cat $b/serial 2>/dev/null)" = "$1" ] '
              '&& echo /dev/${b##*/} && exit 0; done; exit 1')
    return g.run(["sh", "-c", script, "sh", serial], check=True).stdout.strip()


#: every mount stacked on each path unmounted, path by path, in one guest command
UMOUNT_ALL = 'for p in "$@"; do while mountpoint -q "$p"; do umount "$p" || exit 1; done; done'


def umount_all(g: Runs, dirs: OverlayDirs) -> None:
    """Nothing mounted on the overlay targets and the upper fs (in that order): one round trip."""
    g.run(["sh", "-c", UMOUNT_ALL, "sh", dirs.target, dirs.second_target, dirs.fs_mount], check=True)


def fresh_upper(g: Runs, device: str, fstype: str, dirs: OverlayDirs) -> None:
    """mkfs a fresh upper filesystem on ``device`` and make the overlay dirs."""
    umount_all(g, dirs)
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}[fstype]
    sh(g, [*mkfs, device])
    sh(g, ["mkdir", "-p", dirs.fs_mount, dirs.target])
    sh(g, ["mount", "-t", fstype, device, dirs.fs_mount])
    sh(g, ["mkdir", "-p", dirs.lower, dirs.upper, dirs.work])
    sh(g, ["sh", "-c", 'echo lower > "$1/from-lower"', "sh", dirs.lower])


def mount_overlay(g: Runs, dirs: OverlayDirs, *, volatile: bool, target: str | None = None) -> Outcome:
    """mount(2) the overlay of ``dirs`` at ``target`` (default: ``dirs.target``)."""
    return syscall(g, "mount", "overlay", target or dirs.target, "overlay", dirs.options(volatile))


def umount_overlay(g: Runs, dirs: OverlayDirs) -> Outcome:
    return syscall(g, "umount", dirs.target)


def exists(g: Runs, path: str) -> bool:
    return g.run(["test", "-e", path]).exit_status == 0


# === the scenario suite's steps ================================================
#
# Everything below returns what happened; only setup steps that must work
# (mkfs, mkdir, writing a file) raise, through :func:`sh`.


FILESYSTEMS = ("ext4", "xfs")
MKFS = {"ext4": ("mkfs.ext4", "-q", "-F"), "xfs": ("mkfs.xfs", "-q", "-f")}
#: Mount options of the upper fs in the suite.  ``lazytime`` keeps the
#: timestamp update of an in-place overwrite out of the journal/log, so the
#: only writes while dm-flakey fails writes are data writes (a failed journal
#: or log write would abort ext4's journal or shut xfs down: another scenario).
#: ``noinit_itable``: no ext4lazyinit thread writing inode tables behind our back.
UPPER_MOUNT_OPTIONS = {"ext4": "lazytime,noinit_itable", "xfs": "lazytime"}
CHECKPOINT_XATTR = "trusted.overlay.volatile"
UNSEEN_MSG = "Cannot mount volatile when upperdir has an unseen error"

#: kernel log lines saying the upper fs itself broke (metadata I/O failed):
#: the writeback error injection must never cause these.
FS_DAMAGE = re.compile(
    r"Aborting journal|Detected aborted journal|Remounting filesystem read-only|"
    r"EXT4-fs error|I/O error while writing superblock|"
    r"Filesystem has been shut down|Shutting down filesystem|xfs_do_force_shutdown|"
    r"log I/O error|metadata I/O error|Corruption of in-memory data")


def mkfs(g: Runs, device: str, fstype: str) -> None:
    sh(g, [*MKFS[fstype], device])


def mount_upper(g: Runs, device: str, fstype: str, dirs: OverlayDirs,
                options: str | None = None) -> None:
    """The mountpoints made and the upper fs mounted, in one round trip (mkdir's or mount's
    failure fails it, with that command's stderr)."""
    opts = UPPER_MOUNT_OPTIONS.get(fstype) if options is None else options
    sh(g, ["sh", "-c", 'mkdir -p "$1" "$2" "$3" && shift 3 && exec mount "$@"', "sh",
           dirs.fs_mount, dirs.target, dirs.second_target,
           "-t", fstype, *(["-o", opts] if opts else []), device, dirs.fs_mount])


def umount_upper(g: Runs, dirs: OverlayDirs) -> Outcome:
    return syscall(g, "umount", dirs.fs_mount)


def make_overlay_dirs(g: Runs, dirs: OverlayDirs) -> None:
    sh(g, ["sh", "-c", 'mkdir -p "$1" "$2" "$3" && echo lower > "$1/from-lower"', "sh",
           dirs.lower, dirs.upper, dirs.work])


def new_upper(g: Runs, device: str, fstype: str, dirs: OverlayDirs,
              options: str | None = None) -> None:
    """A freshly made upper fs on ``device``, mounted with the suite's options, and the dirs."""
    umount_all(g, dirs)
    mkfs(g, device, fstype)
    mount_upper(g, device, fstype, dirs, options)
    make_overlay_dirs(g, dirs)


def remount_upper(g: Runs, device: str, fstype: str, dirs: OverlayDirs,
                  options: str | None = None) -> Outcome:
    """umount and mount the upper fs again (a new superblock instance)."""
    out = umount_upper(g, dirs)
    if out.ok:
        mount_upper(g, device, fstype, dirs, options)
    return out


def write_file(g: Runs, path: str, text: str) -> None:
    sh(g, ["sh", "-c", 'printf %s "$2" > "$1"', "sh", path, text])


def read_file(g: Runs, path: str) -> str | None:
    res = g.run(["cat", "--", path])
    return res.stdout if res.exit_status == 0 else None


def remove_tree(g: Runs, path: str) -> None:
    sh(g, ["rm", "-rf", "--", path])


def pwrite(g: Runs, path: str, size: str = "1m", pattern: int = 0xcd, *, create: bool = False):
    """``xfs_io pwrite 0 SIZE``: without ``create`` an in-place overwrite (no O_TRUNC, no size change)."""
    return sh(g, ["xfs_io", *(["-f"] if create else []), "-c",
                  f"pwrite -q -S {pattern:#04x} 0 {size}", path])


def force_writeback(g: Runs, upper_file: str) -> Outcome:
    """Write back a file's dirty data with sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER).

    Called on the *upper* file, so the error it reports is this file's only:
    the upper superblock's error stays unseen (no syncfs consumed it).
    """
    return syscall(g, "sync_file_range", upper_file)


def syncfs(g: Runs, path: str) -> Outcome:
    return syscall(g, "syncfs", path)


def fsync(g: Runs, path: str) -> Outcome:
    return syscall(g, "fsync", path)


def quiesce(g: Runs, mountpoint: str) -> None:
    """Sync a filesystem and let it go idle: fsfreeze then thaw.

    Freezing writes everything back, checkpoints ext4's journal and covers the
    xfs log, so nothing but new data is written afterwards.
    """
    sh(g, ["fsfreeze", "--freeze", mountpoint])
    sh(g, ["fsfreeze", "--unfreeze", mountpoint])


def reload_overlay_module(g: Runs):
    """``rmmod overlay; modprobe overlay``: the result of the pair (exit 0 when both worked)."""
    return g.run(["sh", "-c", "rmmod overlay && modprobe overlay"])


def reboot(guest) -> float:
    """Reboot ``guest`` (a :class:`vm.machine.guest.Guest`) keeping its disks; seconds it took."""
    start = time.monotonic()
    guest.reboot()
    return time.monotonic() - start


def parse_getfattr(text: str) -> dict[str, bytes]:
    """``getfattr -d -m - -e hex`` output -> {name: value} (an empty value has no ``=``)."""
    found: dict[str, bytes] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        if value.startswith("0x"):
            found[name] = bytes.fromhex(value[2:])
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            found[name] = value[1:-1].encode()
        else:
            found[name] = value.encode()
    return found


def xattrs(g: Runs, path: str) -> dict[str, bytes]:
    res = g.run(["getfattr", "--absolute-names", "-d", "-m", "-", "-e", "hex", path])
    if res.exit_status != 0:
        raise errors.GuestCommandFailed(cmd=f"getfattr {path}", rc=res.exit_status, detail=f": {res.stderr.strip()}",
                                        fix="check that the guest image has attr installed")
    return parse_getfattr(res.stdout)


def checkpoint(g: Runs, dirs: OverlayDirs) -> bytes | None:
    """The ``trusted.overlay.volatile`` checkpoint of the volatile dir, or None."""
    if not exists(g, dirs.volatile_dir):
        return None
    return xattrs(g, dirs.volatile_dir).get(CHECKPOINT_XATTR)


# --- POSIX ACLs as raw xattrs (the guest image has attr, not acl) ----------------

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
ACL_XATTRS = (ACL_ACCESS, ACL_DEFAULT)
#: include/uapi/linux/posix_acl_xattr.h and posix_acl.h
ACL_XATTR_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
_ACL_TAGS = (ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER)
#: user::rwx, user:65534:r-x, group::r-x, mask::r-x, other::r-x.  The named user
#: and the mask make it more than mode bits can say, so the kernel keeps it as an
#: xattr instead of folding it into the mode (posix_acl_equiv_mode()).
EXTENDED_ACL = ((ACL_USER_OBJ, 7, None), (ACL_USER, 5, 65534), (ACL_GROUP_OBJ, 5, None),
                (ACL_MASK, 5, None), (ACL_OTHER, 5, None))


def posix_acl_xattr(entries: Iterable[tuple[int, int, int | None]]) -> bytes:
    """The value of ``system.posix_acl_access``/``_default``: le32 version 2, then per
    entry le16 tag, le16 perm, le32 id (``None``: ACL_UNDEFINED_ID, for the entries
    without a qualifier).  Entries go in the kernel's order: tag, then id."""
    out = [struct.pack("<I", ACL_XATTR_VERSION)]
    for tag, perm, ident in entries:
        if tag not in _ACL_TAGS or not 0 <= perm <= 7:
            raise ValueError(f"not a POSIX ACL entry: tag {tag:#x}, perm {perm}")
        if (ident is None) != (tag not in (ACL_USER, ACL_GROUP)):
            raise ValueError(f"ACL tag {tag:#x}: only named user/group entries carry an id")
        out.append(struct.pack("<HHI", tag, perm, ACL_UNDEFINED_ID if ident is None else ident))
    return b"".join(out)


def setfattr_argv(path: str, name: str, value: bytes) -> list[str]:
    """``setfattr`` with a binary value (``0s`` + base64, as setfattr(1) reads it)."""
    return ["setfattr", "-n", name, "-v", "0s" + base64.b64encode(value).decode(), "--", path]


def mode_of(g: Runs, path: str) -> str:
    """The permission bits of ``path`` in octal, as ``stat -c %a`` prints them (``0``, ``755``)."""
    return sh(g, ["stat", "-c", "%a", "--", path]).stdout.strip()


def acls_of(g: Runs, path: str) -> list[str]:
    """Which of the POSIX ACL xattrs ``path`` has."""
    found = xattrs(g, path)
    return [name for name in ACL_XATTRS if name in found]


def change_dir_like_a_user(g: Runs, path: str) -> None:
    """chmod 0755 ``path`` and give it a default and an access ACL (:data:`EXTENDED_ACL`)."""
    value = posix_acl_xattr(EXTENDED_ACL)
    sh(g, ["chmod", "0755", "--", path])
    sh(g, setfattr_argv(path, ACL_DEFAULT, value))
    sh(g, setfattr_argv(path, ACL_ACCESS, value))


def fs_damage(lines: Iterable[str]) -> list[str]:
    return [ln for ln in lines if FS_DAMAGE.search(ln)]


# === expected outcomes, as data ================================================

OUTCOMES = ("OK", "EINVAL", "EIO")
#: checks a step may ask for once it came out as expected (see RowRun.checks)
CHECKS = ("dirty", "checkpoint", "files", "work-reset")
#: keys of an extra row that are text, not behaviour columns (``why`` is required)
EXTRA_ROW_TEXT = ("why", "steps")


def base_variant(variant: str) -> str:
    """``patched-debug@6.1`` -> ``patched``: debug builds share the expectations,
    and ``@<base>`` (the kernel base, in a version matrix) selects a base file."""
    variant = variant.split("@", 1)[0]
    return variant[: -len("-debug")] if variant.endswith("-debug") else variant


def variant_base(variant: str) -> str | None:
    """``patched@6.1`` -> ``6.1``; ``None`` when the variant does not name a base."""
    return variant.split("@", 1)[1] if "@" in variant else None


def base_of_version(version: str) -> str:
    """``6.1.192`` -> ``6.1``: the base whose expectations a kernel follows."""
    return ".".join(version.split(".")[:2])


@dataclass(frozen=True)
class StepExpectation:
    step: str
    expect: str                       # "OK", "EINVAL", "EIO"
    log: tuple[str, ...] = ()         # kernel log lines (substrings) that must appear
    then: tuple[str, ...] = ()        # checks once it came out as expected (OK or the errno)


@dataclass(frozen=True)
class RowExpectation:
    row: str
    variant: str
    behaviour: str
    steps: tuple[StepExpectation, ...]

    @property
    def headline(self) -> str:
        return self.steps[-1].expect if self.steps else "?"


class Expectations:
    """The expectations table (``tests/scenarios/expectations.json``)."""

    def __init__(self, data: Mapping, source: str = "<data>",
                 bases: Mapping[str, Mapping] | None = None) -> None:
        self.data = data
        self.source = source
        #: per kernel base (tests/scenarios/bases/<base>.json): {"differences": {variant: {row: ...}}}
        self.bases: dict[str, dict] = {k: dict(v) for k, v in (bases or {}).items()}
        self.messages: dict[str, str] = dict(data.get("messages", {}))
        self.filesystems: tuple[str, ...] = tuple(data.get("filesystems", FILESYSTEMS))
        self.variants: dict[str, dict] = {k: dict(v) for k, v in data["variants"].items()}
        #: the rows of SCENARIOS.md's table ("rows"), in its order
        self.contract_row_ids: list[str] = list(data["rows"])
        self.rows: dict[str, dict] = {k: dict(v) for k, v in data["rows"].items()}
        self._extra: dict[str, object] = dict(data.get("extra_rows", {}))
        #: rows beyond SCENARIOS.md ("extra_rows"): id -> why (where the row comes from)
        self.extra_rows: dict[str, str] = {k: _text(v.get("why") if isinstance(v, Mapping) else None)
                                           for k, v in self._extra.items()}
        self.rows.update({k: {c: s for c, s in v.items() if c not in EXTRA_ROW_TEXT}
                          for k, v in self._extra.items() if isinstance(v, Mapping) and k not in self.rows})
        self.validate()

    @classmethod
    def load(cls, path: Path | str, bases_dir: Path | str | None = None) -> "Expectations":
        """The table, and the per-base differences from ``bases_dir/<base>.json``."""
        path = Path(path)
        bases = {}
        if bases_dir is not None:
            for f in sorted(Path(bases_dir).glob("*.json")):
                bases[f.stem] = _load_json(f)
        return cls(_load_json(path), str(path), bases)

    @property
    def row_ids(self) -> list[str]:
        """Every row: SCENARIOS.md's, then the extra ones."""
        return list(self.rows)

    @property
    def extra_row_ids(self) -> list[str]:
        return list(self.extra_rows)

    def _validate_extra_rows(self) -> None:
        """Each extra row names where it comes from, and is not a SCENARIOS.md row too."""
        for row, spec in self._extra.items():
            where = f"{self.source}: extra_rows.{row}"
            if row in self.contract_row_ids:
                raise errors.ExpectationError(detail=f"{where}: {row!r} is already a row of "
                                                     "SCENARIOS.md (\"rows\"); a row is declared once")
            if not self.extra_rows[row]:
                raise errors.ExpectationError(detail=f"{where}: an extra row needs a non-empty \"why\" "
                                                     "naming where it comes from (e.g. a review finding)")
            if not isinstance(spec.get("steps", ""), str):
                raise errors.ExpectationError(detail=f"{where}: \"steps\" is text (what the row does)")

    def _step(self, row: str, behaviour: str, raw: Mapping) -> StepExpectation:
        unknown = set(raw) - {"step", "expect", "log", "then", "why"}
        if unknown:
            raise errors.ExpectationError(detail=f"{self.source}: {row}/{behaviour}: unknown keys {sorted(unknown)}")
        expect = raw["expect"]
        if expect not in OUTCOMES:
            raise errors.ExpectationError(detail=f"{self.source}: {row}/{behaviour}/{raw['step']}: "
                                   f"outcome {expect!r} is not one of {OUTCOMES}")
        log = tuple(self.messages.get(m, m) for m in raw.get("log", ()))
        if expect != "OK" and raw["step"].startswith(("mount", "remount")) and not log:
            raise errors.ExpectationError(detail=f"{self.source}: {row}/{behaviour}/{raw['step']}: a failing "
                                   "mount must name the kernel log line that explains it")
        then = tuple(raw.get("then", ()))
        bad = [c for c in then if c not in CHECKS]
        if bad:
            raise errors.ExpectationError(detail=f"{self.source}: {row}/{behaviour}: unknown checks {bad}")
        return StepExpectation(raw["step"], expect, log, then)

    def difference(self, row: str, variant: str, base: str | None) -> dict | None:
        """The per-base entry that overrides ``row`` on ``variant``, if any."""
        if base is None:
            return None
        diffs = self.bases.get(base, {}).get("differences", {})
        return diffs.get(base_variant(variant), {}).get(row)

    def behaviour_of(self, row: str, variant: str, base: str | None = None) -> str:
        name = base_variant(variant)
        try:
            spec = self.variants[name]
        except KeyError:
            raise errors.ExpectationError(detail=f"{self.source}: no expectations for kernel variant {variant!r} "
                                   f"(known: {', '.join(self.variants)})") from None
        diff = self.difference(row, variant, base or variant_base(variant))
        if diff is not None:
            return diff["behaves_as"]
        return spec.get("except", {}).get(row, spec["behaves_as"])

    def get(self, row: str, variant: str, base: str | None = None) -> RowExpectation:
        if row not in self.rows:
            raise errors.ExpectationError(detail=f"{self.source}: no row {row!r}")
        behaviour = self.behaviour_of(row, variant, base)
        try:
            raw_steps = self.rows[row][behaviour]
        except KeyError:
            raise errors.ExpectationError(detail=f"{self.source}: row {row!r} has no {behaviour!r} column "
                                   f"(needed by variant {variant!r})") from None
        steps = tuple(self._step(row, behaviour, s) for s in raw_steps)
        return RowExpectation(row, variant, behaviour, steps)

    def validate(self) -> None:
        self._validate_extra_rows()
        for name, spec in self.variants.items():
            if "behaves_as" not in spec:
                raise errors.ExpectationError(detail=f"{self.source}: variant {name!r} has no behaves_as")
        for row in self.rows:
            if row.startswith("_"):
                continue
            for variant in self.variants:
                exp = self.get(row, variant)
                if not exp.steps:
                    raise errors.ExpectationError(detail=f"{self.source}: {row}/{exp.behaviour} has no steps")
        for base, data in self.bases.items():
            where = f"bases/{base}.json"
            if data.get("base") != base:
                raise errors.ExpectationError(detail=f"{where}: 'base' must be {base!r}")
            for variant, rows in data.get("differences", {}).items():
                if variant not in self.variants:
                    raise errors.ExpectationError(detail=f"{where}: unknown variant {variant!r}")
                for row, diff in rows.items():
                    if row not in self.rows:
                        raise errors.ExpectationError(detail=f"{where}: unknown row {row!r}")
                    if set(diff) != {"behaves_as", "why"} or not str(diff["why"]).strip():
                        raise errors.ExpectationError(detail=f"{where}: {variant}/{row} needs exactly behaves_as "
                                               "and a non-empty why (the reason this base differs)")
                    self.get(row, variant, base)   # the column must exist


def _text(value: object) -> str:
    """A text field with its whitespace folded; ``""`` for anything that is not text."""
    return " ".join(value.split()) if isinstance(value, str) else ""


def _load_json(path: Path) -> dict:
    """``json.loads`` that refuses a key given twice in one object (JSON keeps the last silently)."""
    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise errors.ExpectationError(detail=f"{path}: {', '.join(map(repr, twice))} given twice "
                                                 "in one object")
        return dict(items)

    return json.loads(Path(path).read_text(), object_pairs_hook=pairs)


@dataclass
class StepResult:
    step: str
    actual: str
    expected: str
    ok: bool
    detail: str = ""


class RowRun:
    """Walks a row's expected steps as the scenario performs them.

    ``step(name, outcome, log=...)`` compares one outcome (and, for a failure,
    the kernel log lines that must explain it) with the table and raises
    :class:`ExpectationFailed` naming the row, the step, what happened and what
    was expected.  ``checks`` maps a check name of the table's ``then`` to a
    callable returning ``None`` (fine) or what is wrong.
    """

    def __init__(self, expectation: RowExpectation, fs: str,
                 checks: Mapping[str, Callable[[], str | None]] | None = None) -> None:
        self.exp = expectation
        self.fs = fs
        self.checks = dict(checks or {})
        self.results: list[StepResult] = []
        self.index = 0
        self.failure: str | None = None

    @property
    def label(self) -> str:
        return f"{self.exp.row}[{self.fs}-{self.exp.variant}]"

    def fail(self, text: str) -> errors.ExpectationFailed:
        self.failure = f"{self.label}: {text}"
        return errors.ExpectationFailed(self.failure)

    def step(self, name: str, outcome: Outcome | str, log: Iterable[str] = ()) -> Outcome | str:
        __tracebackhide__ = True   # pytest: the failure message says it all
        actual = str(outcome)
        log = list(log)
        if self.index >= len(self.exp.steps):
            self.results.append(StepResult(name, actual, "-", False))
            raise self.fail(f"{name} returned {actual}, but the table ({self.exp.behaviour}) "
                            f"expects no step after {self.exp.steps[-1].step!r}")
        want = self.exp.steps[self.index]
        self.index += 1
        if want.step != name:
            self.results.append(StepResult(name, actual, want.expect, False))
            raise self.fail(f"the scenario ran step {name!r} where the table expects "
                            f"{want.step!r} (harness bug)")
        tail = _log_tail(log)
        if actual != want.expect:
            self.results.append(StepResult(name, actual, want.expect, False, tail))
            raise self.fail(f"{name} returned {actual}, expected {want.expect} (log: {tail})")
        missing = [m for m in want.log if not any(m in ln for ln in log)]
        if missing:
            self.results.append(StepResult(name, actual, want.expect, False, tail))
            raise self.fail(f"{name} returned {actual} as expected, but the kernel log lacks "
                            f"{' and '.join(repr(m) for m in missing)} (log: {tail})")
        for check in want.then:
            func = self.checks.get(check)
            problem = f"no check {check!r} in this scenario (harness bug)" if func is None else func()
            if problem:
                self.results.append(StepResult(name, actual, want.expect, False, problem))
                raise self.fail(f"{name} returned {actual} as expected, but {problem}")
        self.results.append(StepResult(name, actual, want.expect, True))
        return outcome

    def finish(self) -> None:
        __tracebackhide__ = True
        if self.index < len(self.exp.steps):
            left = ", ".join(s.step for s in self.exp.steps[self.index:])
            raise self.fail(f"the scenario ended before the table's steps {left}")

    @property
    def actual_headline(self) -> str:
        if not self.results:
            return "-"
        for r in self.results:
            if not r.ok:
                return r.actual
        return self.results[-1].actual


def _log_tail(lines: list[str], count: int = 4) -> str:
    interesting = [ln.strip() for ln in lines
                   if any(k in ln for k in ("overlay", "volatile", "EXT4", "XFS", "I/O error"))]
    picked = (interesting or [ln.strip() for ln in lines])[-count:]
    return " | ".join(picked) if picked else "nothing logged"


@dataclass(frozen=True)
class ContractRow:
    """One row of SCENARIOS.md's behaviour table: its id and the text of its cells."""

    id: str
    steps: str
    p: str      # the P column (patched kernel)
    b: str      # the B column (unpatched baseline)


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table line (``\\|`` is a literal bar)."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def parse_scenarios_table(text: str) -> list[ContractRow]:
    """The behaviour table of SCENARIOS.md (the one whose header starts with ``id``)."""
    rows: list[ContractRow] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            if cells[0] == "id":
                header = cells
                missing = [c for c in ("steps", "P", "B") if c not in header]
                if missing:
                    raise errors.ExpectationError(
                        detail=f"SCENARIOS.md: the behaviour table has no {'/'.join(missing)} column "
                               f"(header: {line.strip()})")
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        cell = dict(zip(header, cells))
        rows.append(ContractRow(cells[0].strip("`"), cell.get("steps", ""), cell.get("P", ""),
                                cell.get("B", "")))
    return rows


def parse_scenarios_md(text: str) -> list[str]:
    """Row ids of the behaviour table in SCENARIOS.md (first column after the ``id`` header)."""
    return [row.id for row in parse_scenarios_table(text)]


_CELL_OUTCOME = re.compile(r"\b(OK|E[A-Z]{2,})\b")


def cell_outcome(cell: str, same: str | None = None) -> str:
    """The outcome a P or B cell of SCENARIOS.md states: "OK; files intact" -> OK,
    "EINVAL (instance id changed)" -> EINVAL, "fsync fails both times, syncfs EIO" -> EIO;
    "same" (a B cell) is ``same``, the outcome of the row's P cell."""
    text = cell.strip()
    if text.lower() == "same":
        if same is None:
            raise errors.ExpectationError(detail=f"SCENARIOS.md: cell {cell!r} says 'same' with "
                                                 "no P outcome to refer to")
        return same
    found = set(_CELL_OUTCOME.findall(text))
    if len(found) != 1:
        what = "no outcome" if not found else f"several outcomes ({', '.join(sorted(found))})"
        raise errors.ExpectationError(detail=f"SCENARIOS.md: cell {cell!r} names {what}: "
                                             "it must state one of OK or an errno name")
    return found.pop()
