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
    ``reboot`` and ``plan.spec.console_log``, over a FakeConnection."""

    def __init__(self, steps, console_log: Path) -> None:
        self.pending = list(steps)
        self.dirs = OverlayDirs()
        self.conn = FakeConnection({"": self.answer})
        self.kmsg: list[str] = ["[    0.000000] Linux version 6.12.117"]
        self.files: dict[str, str] = {}
        self.overlay_mounted = False
        self.table = ""
        self.boots = 1
        self.plan = SimpleNamespace(spec=SimpleNamespace(console_log=console_log))

    def run(self, cmd, **kwargs):
        return self.conn.run(cmd, **kwargs)

    def reboot(self) -> None:
        self.boots += 1
        self.kmsg = [f"[    0.000000] Linux version 6.12.117 (boot {self.boots})"]
        self.overlay_mounted, self.table = False, ""

    def answer(self, line: str):
        argv = shlex.split(line)
        if argv[0] == scenario.SYSCALL:
            return self.syscall(argv[1], argv[2:])
        if argv[:3] == ["sh", "-c", 'echo "$1" > /dev/kmsg']:
            self.kmsg.append(f"[    1.000000] {argv[4]}")
        elif argv[:3] == ["sh", "-c", 'printf %s "$2" > "$1"']:
            self.files[argv[4]] = argv[5]
        elif argv[:2] == ["cat", "--"]:
            return self.files.get(argv[2], 1)
        elif argv[:2] == ["dmsetup", "load"]:
            self.table = argv[-1]
        elif argv[0] in ("dmesg", "blockdev", "getfattr"):
            return {"dmesg": "\n".join(self.kmsg), "blockdev": "2097152\n",
                    "getfattr": f"{scenario.CHECKPOINT_XATTR}=0x0102\n"}[argv[0]]
        return None

    def syscall(self, op: str, args: list[str]):
        if op == "umount":
            if args != [self.dirs.target]:   # the upper fs: busy under a mounted overlay
                return _failed("EBUSY") if self.overlay_mounted else "ok\n"
            was, self.overlay_mounted = self.overlay_mounted, False
            return "ok\n" if was else _failed("EINVAL")
        if not self.pending:
            raise AssertionError(f"`ovl-syscall {op} {shlex.join(args)}` after the table's last step")
        step = self.pending.pop(0)
        problem = _syscall_problem(step, op, args, self.dirs)
        if op == "mount" and self.overlay_mounted:
            problem = f"step {step.step!r} mounts the overlay over a mounted one (no umount before it)"
        if op == "sync_file_range" and step.expect == "EIO" and "error_writes" not in self.table:
            problem = f"step {step.step!r} expects EIO, but the dm-flakey table is {self.table!r}"
        if problem:
            raise AssertionError(problem)
        if step.expect == "OK":
            self.overlay_mounted = self.overlay_mounted or op == "mount"
            return "ok\n"
        self.kmsg += [f"[    2.000000] overlayfs: {line}" for line in step.log]
        return _failed(step.expect)


def _failed(name: str) -> CommandResult:
    """What ovl-syscall prints when the call fails with errno ``name``."""
    number = getattr(errno, name)
    return CommandResult((scenario.SYSCALL,), 1, f"errno={number} {name}: {os.strerror(number)}\n", "")


# --- every row, on the B, P and P-without-errseq-check columns ------------------------

def run_row(row: str, variant: str, tmp_path: Path) -> tuple[FakeGuest, report.Case]:
    """The real test_row over a FakeGuest; returns the guest and the matrix case it recorded."""
    exp = TABLE.get(row, variant)
    console_log = tmp_path / "console.log"
    console_log.write_text("[    0.000000] Linux version 6.12.117\n")
    guest = FakeGuest(exp.steps, console_log)
    nodeid = f"test_row[{row}-{FS}-{variant}]"
    env = ENV.ScenarioEnv(guest, FS, OverlayDirs(), Flakey(guest, "/dev/vdc", ENV.FLAKEY_NAME),
                          tmp_path, f"{row}[{FS}-{variant}]")
    env.fresh()
    matrix = report.Matrix(TABLE.row_ids, TABLE.filesystems)
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
