"""Every row of tests/scenarios/test_scenarios.py, run without a VM.

The real ``test_row`` and the real ``ScenarioEnv`` (tests/scenarios/conftest.py)
drive a :class:`FakeGuest` over a FakeConnection.  The fake answers each
checked syscall (mount, sync_file_range, syncfs, fsync) with the next step of
the row's expectation, after checking that the syscall is the one the step's
name says (mount with or without ``volatile``, syncfs of the upper fs or of
the overlay, ...), and logs the kernel lines that step requires.  So what is
checked is the row functions' step names, their order and their syscalls: a
typo in a step name fails here, not on a booted guest.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import KernelLog
from tests.fakes import FakeConnection
from vm import errors
from vm.machine.flakey import Flakey
from vm.machine.ssh import CommandResult
from vm.suites import report, scenario
from vm.suites.scenario import OverlayDirs, StepExpectation

pytestmark = pytest.mark.unit

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
VARIANTS = ("baseline", "patched", "prefix-3")   # the B, P and P-without-errseq-check columns
FS = "ext4"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENV = _load("scenario_env", SCENARIOS / "conftest.py")        # ScenarioEnv, load_expectations
ROWS = _load("scenario_rows", SCENARIOS / "test_scenarios.py")  # ROWS, test_row
SMOKE = _load("scenario_smoke", SCENARIOS / "test_smoke.py")
TABLE = ENV.load_expectations()

#: step name -> (ovl-syscall operation, does this argv do what the name says?)
STEP_SYSCALLS = (
    (("mount volatile", "remount volatile"), "mount", lambda a, d: a == ["overlay", d.target, "overlay",
                                                                         d.options(True)]),
    (("mount plain", "remount plain"), "mount", lambda a, d: a == ["overlay", d.target, "overlay",
                                                                   d.options(False)]),
    (("mount volatile on second target",), "mount",
     lambda a, d: a == ["overlay", d.second_target, "overlay", d.options(True)]),
    (("force writeback of upper",), "sync_file_range",
     lambda a, d: len(a) == 1 and a[0].startswith(d.upper + "/")),
    (("syncfs upper fs",), "syncfs", lambda a, d: a == [d.fs_mount]),
    (("syncfs on overlay",), "syncfs", lambda a, d: a == [d.target]),
    (("fsync on overlay",), "fsync",
     lambda a, d: len(a) == 1 and a[0].startswith(d.target + "/")),
)


def _syscall_problem(step: StepExpectation, op: str, args: list[str], dirs: OverlayDirs) -> str | None:
    name = step.step.rstrip("0123456789 ")       # "remount volatile 2" -> "remount volatile"
    for names, want_op, fits in STEP_SYSCALLS:
        if name in names:
            if op == want_op and fits(args, dirs):
                return None
            return f"the table's next step {step.step!r} is not `ovl-syscall {op} {shlex.join(args)}`"
    return f"the table's step {step.step!r} is unknown to this fake (add it to STEP_SYSCALLS)"


class FakeGuest:
    """What ScenarioEnv, Flakey and the scenario helpers use of a Guest: ``run``,
    ``reboot`` and ``plan.spec.console_log``, over a FakeConnection.

    It keeps the state the rows look at: the overlays mounted (per mountpoint),
    the files written, the dm-flakey table, and the mode and POSIX ACL xattrs of
    workdir/work, which every successful overlay mount resets to mode 000 and no
    ACL (what overlayfs does to a new work dir, and the series to a kept one)
    unless ``resets_work`` is false.  ``outcomes`` (step name -> errno name) makes
    a checked syscall return something other than the table's expectation.
    ``acls``: ``kept`` (setfattr stores them), ``unsupported`` (setfattr fails
    with EOPNOTSUPP), ``dropped`` (setfattr exits 0 and nothing is stored)."""

    def __init__(self, steps, console_log: Path, *, resets_work: bool = True,
                 outcomes: dict[str, str] | None = None, acls: str = "kept") -> None:
        self.acls = acls
        self.mountinfo = ""
        self.pending = list(steps)
        self.dirs = OverlayDirs()
        self.conn = FakeConnection({"": self.answer})
        self.kmsg: list[str] = ["[    0.000000] Linux version 6.12.117"]
        self.files: dict[str, str] = {}
        self.mounted: set[str] = set()
        self.work = {"mode": "0", "acls": set()}
        self.resets_work = resets_work
        self.outcomes = dict(outcomes or {})
        self.table = ""
        self.boots = 1
        self.plan = SimpleNamespace(spec=SimpleNamespace(console_log=console_log))

    def run(self, cmd, **kwargs):
        return self.conn.run(cmd, **kwargs)

    def reboot(self) -> None:
        self.boots += 1
        self.kmsg = [f"[    0.000000] Linux version 6.12.117 (boot {self.boots})"]
        self.mounted, self.table = set(), ""

    def answer(self, line: str):
        argv = shlex.split(line)
        if argv[0] == scenario.SYSCALL:
            return self.syscall(argv[1], argv[2:])
        if argv[0] in ("chmod", "setfattr", "stat", "getfattr"):
            return self.xattr_tools(argv)
        if argv[:3] == ["sh", "-c", 'echo "$1" > /dev/kmsg']:
            self.kmsg.append(f"[    1.000000] {argv[4]}")
        elif argv[:3] == ["sh", "-c", 'printf %s "$2" > "$1"']:
            self.files[argv[4]] = argv[5]
        elif argv[:2] == ["cat", "--"]:
            return self.files.get(argv[2], 1)
        elif argv == ["cat", "/proc/self/mountinfo"]:
            return self.mountinfo
        elif argv[:2] == ["dmsetup", "load"]:
            self.table = argv[-1]
        elif argv[0] in ("dmesg", "blockdev"):
            return {"dmesg": "\n".join(self.kmsg), "blockdev": "2097152\n"}[argv[0]]
        return None

    def xattr_tools(self, argv: list[str]):
        """chmod, setfattr, stat -c %a and getfattr: on workdir/work they use its state."""
        if argv[-1] != self.dirs.work_dir:
            if argv[0] == "getfattr":
                return f"{scenario.CHECKPOINT_XATTR}=0x0102\n"
            raise AssertionError(f"`{shlex.join(argv)}`: the fake knows only {self.dirs.work_dir}")
        if argv[0] == "chmod":
            self.work["mode"] = argv[1].lstrip("0") or "0"
        elif argv[0] == "setfattr" and self.acls == "unsupported":
            return CommandResult(tuple(argv), 1, "", f"setfattr: {argv[-1]}: Operation not supported\n")
        elif argv[0] == "setfattr" and self.acls == "kept":
            self.work["acls"].add(argv[2])
        elif argv[0] == "stat":
            return self.work["mode"] + "\n"
        else:
            return "".join(f"{name}=0x02000000\n" for name in sorted(self.work["acls"]))
        return None

    def umount(self, target: str):
        if target == self.dirs.fs_mount:   # the upper fs: busy under a mounted overlay
            return _failed("EBUSY") if self.mounted else "ok\n"
        if target not in self.mounted:
            return _failed("EINVAL")
        self.mounted.discard(target)
        return "ok\n"

    def syscall(self, op: str, args: list[str]):
        if op == "umount":
            return self.umount(args[0])
        if not self.pending:
            raise AssertionError(f"`ovl-syscall {op} {shlex.join(args)}` after the table's last step")
        step = self.pending.pop(0)
        problem = _syscall_problem(step, op, args, self.dirs)
        if op == "mount" and args[1] in self.mounted:
            problem = f"step {step.step!r} mounts the overlay over a mounted one (no umount before it)"
        if op == "sync_file_range" and step.expect == "EIO" and "error_writes" not in self.table:
            problem = f"step {step.step!r} expects EIO, but the dm-flakey table is {self.table!r}"
        if problem:
            raise AssertionError(problem)
        outcome = self.outcomes.get(step.step, step.expect)
        if outcome == "OK":
            if op == "mount":
                self.mounted.add(args[1])
                if self.resets_work:
                    self.work = {"mode": "0", "acls": set()}
            return "ok\n"
        self.kmsg += [f"[    2.000000] overlayfs: {line}" for line in step.log]
        return _failed(outcome)


def _failed(name: str) -> CommandResult:
    """What ovl-syscall prints when the call fails with errno ``name``."""
    number = getattr(errno, name)
    return CommandResult((scenario.SYSCALL,), 1, f"errno={number} {name}: {os.strerror(number)}\n", "")


# --- every row, on the B, P and P-without-errseq-check columns ------------------------

def run_row(row: str, variant: str, tmp_path: Path, **fake) -> tuple[FakeGuest, report.Case]:
    """The real test_row over a FakeGuest (``fake``: its options); returns the guest and
    the matrix case it recorded."""
    exp = TABLE.get(row, variant)
    console_log = tmp_path / "console.log"
    console_log.write_text("[    0.000000] Linux version 6.12.117\n")
    guest = FakeGuest(exp.steps, console_log, **fake)
    nodeid = f"test_row[{row}-{FS}-{variant}]"
    env = ENV.ScenarioEnv(guest, FS, OverlayDirs(), Flakey(guest, "/dev/vdc", ENV.FLAKEY_NAME),
                          tmp_path, f"{row}[{FS}-{variant}]")
    env.fresh()
    matrix = report.Matrix(TABLE.row_ids, TABLE.filesystems, extra=TABLE.extra_rows)
    matrix.add_case(nodeid, row, FS, variant)
    request = SimpleNamespace(node=SimpleNamespace(nodeid=nodeid))
    ROWS.test_row(row, FS, variant, SimpleNamespace(version="6.12.117"), guest,
                  KernelLog(guest, nodeid), env, matrix, TABLE, request)
    return guest, matrix.cases[nodeid]


CASES = [(row, v) for row in TABLE.row_ids for v in VARIANTS]


# ("variant" would be parametrized again by tests/conftest.py: the kernel is "label" here)
@pytest.mark.parametrize("row,label", CASES, ids=[f"{row}-{v}" for row, v in CASES])
def test_row_steps_match_the_table(row, label, tmp_path):
    guest, case = run_row(row, label, tmp_path)
    exp = TABLE.get(row, label)
    assert [(s.step, s.actual, s.ok) for s in case.steps] == [(s.step, s.expect, True) for s in exp.steps]
    assert case.actual == case.expected == exp.headline
    assert guest.pending == [], "the table's steps were all run"
    assert guest.boots == (2 if row == "rebooted" else 1)


# --- a broken row fails ---------------------------------------------------------------

def misspelled(env, run):
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.mount(run, "remount volatil", volatile=True)


def wrong_option(env, run):
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.mount(run, "remount volatile", volatile=False)


def no_umount(env, run):
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.mount(run, "remount volatile", volatile=True)


def skipped_step(env, run):
    env.mount(run, "mount volatile", volatile=True)
    env.inject_writeback_error(run)
    env.umount_overlay()
    env.mount(run, "remount volatile", volatile=True)    # without "syncfs upper fs"


@pytest.mark.parametrize("row,func,error,match", [
    ("volatile-to-volatile", misspelled, errors.ExpectationFailed,
     "ran step 'remount volatil' where the table expects 'remount volatile'"),
    ("volatile-to-volatile", wrong_option, AssertionError,
     "next step 'remount volatile' is not `ovl-syscall mount overlay /mnt/ovl overlay "
     "lowerdir=/mnt/upperfs/lower,upperdir=/mnt/upperfs/upper,workdir=/mnt/upperfs/work`"),
    ("volatile-to-volatile", no_umount, AssertionError, "mounts the overlay over a mounted one"),
    ("wb-error-seen", skipped_step, AssertionError,
     "next step 'syncfs upper fs' is not `ovl-syscall mount"),
], ids=["misspelled-step", "plain-for-volatile", "no-umount", "skipped-step"])
@pytest.mark.parametrize("label", ["baseline", "patched"])
def test_a_broken_row_fails(row, func, error, match, label, tmp_path, monkeypatch):
    monkeypatch.setitem(ROWS.ROWS, row, func)
    with pytest.raises(error, match=match):
        run_row(row, label, tmp_path)


def second_at_first_target(env, run):
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.mount(run, "mount volatile on second target", volatile=True)


@pytest.mark.parametrize("label", ["baseline", "patched"])
def test_the_second_mount_goes_to_the_second_target(label, tmp_path, monkeypatch):
    monkeypatch.setitem(ROWS.ROWS, "workdir-in-use", second_at_first_target)
    with pytest.raises(AssertionError, match="next step 'mount volatile on second target' is not "
                                             "`ovl-syscall mount overlay /mnt/ovl overlay"):
        run_row("workdir-in-use", label, tmp_path)


# --- the extra rows: what they do to the guest ------------------------------------------

def test_workdir_in_use_keeps_the_first_mount(tmp_path):
    guest, _case = run_row("workdir-in-use", "patched", tmp_path)
    assert guest.mounted == {guest.dirs.target}, "the live mount stays, the second one failed"
    assert any("volatile reuse refused: workdir in use" in ln for ln in guest.kmsg)


def test_workdir_in_use_fails_when_the_second_mount_is_allowed(tmp_path):
    # the patched kernel before the fix: the second mount succeeded (and cleaned the live work dir)
    with pytest.raises(errors.ExpectationFailed, match=r"workdir-in-use\[ext4-patched\]: mount volatile on "
                                                       "second target returned OK, expected EINVAL"):
        run_row("workdir-in-use", "patched", tmp_path, outcomes={"mount volatile on second target": "OK"})


def test_cleanup_unmounts_both_overlays(tmp_path):
    # should the second overlay have been mounted after all (a kernel that allows it)
    guest = FakeGuest([], tmp_path / "console.log")
    opts = OverlayDirs().options(True)
    guest.mountinfo = ("40 22 253:0 / /mnt/upperfs rw - ext4 /dev/mapper/ovl-flakey rw\n"
                       f"41 22 0:40 / /mnt/ovl rw - overlay overlay rw,{opts}\n"
                       f"42 22 0:41 / /mnt/ovl2 rw - overlay overlay rw,{opts}\n")
    env = ENV.ScenarioEnv(guest, FS, OverlayDirs(), Flakey(guest, "/dev/vdc", ENV.FLAKEY_NAME),
                          tmp_path, "workdir-in-use[ext4-patched]")
    env.cleanup()
    calls = guest.conn.calls
    umounts = [c for c in calls if c.startswith("umount ")]
    assert umounts == ["umount /mnt/ovl2", "umount /mnt/ovl", "umount /mnt/upperfs"]
    assert calls.index(umounts[-1]) < calls.index("dmsetup remove --retry ovl-flakey")
    sweep = [shlex.split(c)[4:] for c in calls if "while mountpoint" in c]
    assert sweep == [["/mnt/ovl", "/mnt/ovl2", "/mnt/upperfs"]], "one sweep, overlays before the upper fs"


@pytest.mark.parametrize("label,mode,acls", [
    ("patched", "0", set()),
    ("baseline", "755", set(scenario.ACL_XATTRS)),     # the remount was refused: nothing reset it
])
def test_work_reset_changes_the_work_dir_before_the_remount(label, mode, acls, tmp_path):
    guest, _case = run_row("work-reset", label, tmp_path)
    calls = guest.conn.calls
    mounts = [i for i, c in enumerate(calls) if c.startswith(f"{scenario.SYSCALL} mount")]
    changed = [i for i, c in enumerate(calls) if c.startswith(("chmod 0755", "setfattr"))]
    assert len(changed) == 3 and mounts[0] < min(changed) and max(changed) < mounts[1]
    assert guest.work == {"mode": mode, "acls": acls}


def test_work_reset_fails_when_the_kernel_keeps_the_changes(tmp_path):
    with pytest.raises(errors.ExpectationFailed, match=(
            "remount volatile returned OK as expected, but /mnt/upperfs/work/work was not reset: "
            "mode 755, not 0, system.posix_acl_access is still set, system.posix_acl_default is still set")):
        run_row("work-reset", "patched", tmp_path, resets_work=False)


@pytest.mark.parametrize("acls,match", [
    ("unsupported", ("harness error: changing /mnt/upperfs/work/work failed: guest command `setfattr -n "
                     "system.posix_acl_default .*Operation not supported")),
    ("dropped", ("harness error: after chmod 0755 and setfattr of both ACLs /mnt/upperfs/work/work has "
                 "mode 755 and ACL xattrs none")),
], ids=["setfattr-fails", "acl-not-kept"])
@pytest.mark.parametrize("label", ["baseline", "patched"])
def test_work_reset_without_acls_is_a_harness_error(acls, match, label, tmp_path):
    with pytest.raises(AssertionError, match=match) as err:
        run_row("work-reset", label, tmp_path, acls=acls)
    assert not isinstance(err.value, errors.ExpectationFailed), "the harness broke, not the kernel"


# --- the smoke test's second mount comes from the same table -----------------------------

OVERRIDE_61 = {"6.1": {"base": "6.1", "differences": {
    "patched": {"volatile-to-volatile": {"behaves_as": "B", "why": "a base where reuse is refused"}}}}}


@pytest.mark.parametrize("label,version,expect", [
    ("baseline", "6.12.117", "EINVAL"),
    ("prefix-1", "6.12.117", "EINVAL"),
    ("prefix-3-debug", "6.12.117", "OK"),
    ("patched", "6.12.117", "OK"),
    ("patched", "6.1.192", "EINVAL"),            # the base comes from the kernel's version ...
    ("patched-debug@6.1", "6.12.117", "EINVAL"),  # ... or from the variant's name
], ids=["baseline", "prefix-1", "prefix-3-debug", "patched", "patched-on-6.1", "debug-at-6.1"])
def test_smoke_second_mount_follows_the_table(label, version, expect):
    table = scenario.Expectations(TABLE.data, "t", OVERRIDE_61)
    want = SMOKE.second_mount_expectation(table, label, version)
    assert (want.step, want.expect) == ("remount volatile", expect)
    assert want.log == (() if expect == "OK" else (scenario.INCOMPAT_MSG,))


def test_smoke_needs_one_remount_step():
    data = {**TABLE.data, "rows": {**TABLE.data["rows"], SMOKE.ROW: {
        "P": [{"step": "mount volatile", "expect": "OK"}],
        "B": [{"step": "mount volatile", "expect": "OK"}]}}}
    with pytest.raises(AssertionError, match="must have one 'remount volatile' step"):
        SMOKE.second_mount_expectation(scenario.Expectations(data), "patched", "6.12.117")
