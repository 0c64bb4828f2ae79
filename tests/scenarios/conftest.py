"""Scenario suite plumbing: parametrization from the expectations table,
a fresh upper filesystem on dm-flakey per scenario, and the result matrix.

- ``row`` x ``fs`` come from ``expectations.json`` (rows in SCENARIOS.md
  order, then its extra rows; ``ext4`` and ``xfs``); ``variant`` is the session parameter of
  tests/conftest.py, so ids read ``test_row[volatile-to-volatile-xfs-patched]``.
- ``env`` gives each scenario a fresh dm-flakey device over a scratch disk,
  a freshly made upper fs on it and the overlay dirs; it tears them down
  after the scenario, leaving the session guest ready for the next one.
- Every scenario records into the session's :class:`vm.suites.report.Matrix`;
  at the end it is written to ``<results_dir>/matrix.md`` and ``matrix.html``
  and the Markdown is printed in the terminal summary.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

from vm import errors
from vm.machine import console
from vm.machine.flakey import ERROR_WRITES, NORMAL, Flakey
from vm.suites import report, scenario
from vm.suites.scenario import OverlayDirs

EXPECTATIONS = Path(__file__).with_name("expectations.json")
BASES = Path(__file__).with_name("bases")
#: scratch disk the suite owns (the smoke test uses ovlscratch0 directly)
SCRATCH_SERIALS = ("ovlscratch1", "ovlscratch0")
FLAKEY_NAME = "ovl-flakey"
MATRIX = pytest.StashKey[report.Matrix]()


@functools.lru_cache(maxsize=None)
def load_expectations() -> scenario.Expectations:
    return scenario.Expectations.load(EXPECTATIONS, BASES)


# --- parametrization -------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    # tryfirst: row and fs come before tests/conftest.py's session "variant",
    # so the ids read row-fs-variant.
    if "row" in metafunc.fixturenames:
        rows = load_expectations().row_ids
        metafunc.parametrize("row", rows, ids=rows)
    if "fs" in metafunc.fixturenames:
        filesystems = list(load_expectations().filesystems)
        wanted = metafunc.config.getoption("--fs")
        unknown = sorted(set(wanted) - set(filesystems))
        if unknown:
            raise pytest.UsageError(f"--fs {', '.join(unknown)}: use one of {', '.join(filesystems)}")
        filesystems = [fs for fs in filesystems if not wanted or fs in wanted]
        metafunc.parametrize("fs", filesystems, ids=filesystems)


@pytest.fixture(scope="session")
def expectations() -> scenario.Expectations:
    return load_expectations()


# --- the matrix ----------------------------------------------------------------------

_CONFIG: list = []   # the session's config, for hooks that do not get it


def pytest_configure(config):
    exp = load_expectations()
    config.stash[MATRIX] = report.Matrix(exp.row_ids, exp.filesystems, extra=exp.extra_rows)
    _CONFIG[:] = [config]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    # Run each variant's tests together, so each kernel boots once.  pytest's own
    # reordering does not group the session-scoped "variant" when a function-scoped
    # parameter (row, fs) was applied before it; a stable sort by variant does.
    order: dict[str, int] = {}

    def variant_rank(item) -> int:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "variant" not in params:
            return -1
        return order.setdefault(params["variant"], len(order))

    for item in items:
        variant_rank(item)
    items[:] = sorted(items, key=variant_rank)

    matrix = config.stash.get(MATRIX, None)
    if matrix is None:
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if {"row", "fs", "variant"} <= set(params):
            matrix.add_case(item.nodeid, params["row"], params["fs"], params["variant"])


def _message(rep) -> str:
    crash = getattr(getattr(rep, "longrepr", None), "reprcrash", None)
    if crash is not None:
        text = crash.message
    elif isinstance(getattr(rep, "longrepr", None), tuple):  # skip: (path, line, reason)
        text = rep.longrepr[2]
    else:
        text = str(getattr(rep, "longrepr", "") or "")
    text = text.split("\n")[0]
    for prefix in ("AssertionError: ", "vm.errors.ExpectationFailed: ", "Failed: ", "Skipped: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def pytest_runtest_logreport(report):
    matrix = _CONFIG[0].stash.get(MATRIX, None) if _CONFIG else None
    if matrix is not None:
        matrix.report(report.nodeid, report.when, report.outcome, report.duration,
                      _message(report) if report.outcome != "passed" else "",
                      start=getattr(report, "start", None), stop=getattr(report, "stop", None))


def _results_dir(config) -> Path:
    from vm.settings import load

    return load().results_dir


def pytest_sessionfinish(session, exitstatus):
    matrix = session.config.stash.get(MATRIX, None)
    if matrix is None or not any(c.status != report.NOT_RUN for c in matrix.cases.values()):
        return
    directory = matrix.results_dir or _results_dir(session.config)
    matrix.written = matrix.write(directory)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    matrix = config.stash.get(MATRIX, None)
    if matrix is None or not getattr(matrix, "written", None):
        return
    terminalreporter.write_sep("=", "scenario matrix")
    for line in matrix.render_markdown().splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written: {', '.join(str(p) for p in matrix.written)}")


@pytest.fixture
def matrix(request, results_dir) -> report.Matrix:
    m = request.config.stash[MATRIX]
    m.results_dir = results_dir
    return m


# --- the per-scenario environment -------------------------------------------------

class ScenarioEnv:
    """A fresh upper fs on dm-flakey, the overlay dirs, and the steps of the rows."""

    def __init__(self, guest, fs: str, dirs: OverlayDirs, flakey: Flakey, results_dir: Path,
                 label: str) -> None:
        self.g = guest
        self.fs = fs
        self.dirs = dirs
        self.flakey = flakey
        self.results_dir = results_dir
        self.label = label
        self.files: dict[str, str] = {}     # path through the overlay -> content
        self.reboot_seconds = 0.0

    # -- setup ------------------------------------------------------------
    def fresh(self) -> None:
        scenario.umount_all(self.g, self.dirs)
        if self.flakey.exists():
            self.flakey.remove()
        self.flakey.create(NORMAL)
        scenario.new_upper(self.g, self.flakey.device, self.fs, self.dirs)

    def cleanup(self) -> None:
        # Flakey.remove resumes the device, then unmounts every overlay whose dirs
        # are on it (a second one at dirs.second_target too), the fs, and removes
        # it; the sweep then makes sure none of the suite's mountpoints is left
        # mounted, so the next scenario starts clean.
        self.flakey.remove()
        scenario.umount_all(self.g, self.dirs)

    # -- a checked step ---------------------------------------------------
    def step(self, run: scenario.RowRun, name: str, action) -> scenario.Outcome:
        __tracebackhide__ = True
        mark = scenario.kmsg_mark(self.g, name.replace(" ", "-"))
        outcome = action()
        log = scenario.kmsg_since(self.g, mark)
        return run.step(name, outcome, log)

    def mount(self, run: scenario.RowRun, name: str, *, volatile: bool) -> scenario.Outcome:
        __tracebackhide__ = True
        return self.step(run, name, lambda: scenario.mount_overlay(self.g, self.dirs, volatile=volatile))

    def mount_second(self, run: scenario.RowRun, name: str, *, volatile: bool) -> scenario.Outcome:
        """Mount the same dirs again at ``dirs.second_target`` (the first overlay still mounted)."""
        __tracebackhide__ = True
        return self.step(run, name, lambda: scenario.mount_overlay(
            self.g, self.dirs, volatile=volatile, target=self.dirs.second_target))

    # -- setup steps that must work ---------------------------------------
    def must(self, what: str, outcome: scenario.Outcome) -> None:
        if not outcome.ok:
            raise AssertionError(f"{self.label}: {what} returned {outcome.detail or outcome}, "
                                 "expected OK (a step every row needs)")

    def umount_overlay(self) -> None:
        self.must("umount overlay", scenario.umount_overlay(self.g, self.dirs))

    def write_files(self, tag: str, count: int = 2) -> None:
        for i in range(count):
            path = f"{self.dirs.target}/{tag}-{i}"
            text = f"{tag} {i} {self.label}\n"
            scenario.write_file(self.g, path, text)
            self.files[path] = text

    def remount_upper(self) -> None:
        self.must("umount upper fs", scenario.remount_upper(self.g, self.flakey.device, self.fs, self.dirs))

    def reload_module(self) -> None:
        res = scenario.reload_overlay_module(self.g)
        if res.exit_status != 0:
            raise AssertionError(f"{self.label}: `rmmod overlay && modprobe overlay` exited "
                                 f"{res.exit_status}: {(res.stderr or res.stdout).strip()}")

    def reboot(self, klog) -> None:
        """Reboot keeping the disks, then the flakey device and the upper fs again (no mkfs)."""
        before = klog.lines()
        splats = console.find_splats(before)
        if splats:
            raise AssertionError(f"kernel reported {', '.join(str(s) for s in splats)} before the reboot\n"
                                 + "\n".join("\n".join(s.context) for s in splats))
        log = self.g.plan.spec.console_log
        safe = self.label.replace("[", "-").replace("]", "")
        shutil.copy2(log, self.results_dir / f"console-{safe}-before-reboot.log")
        self.reboot_seconds = scenario.reboot(self.g)
        # a new boot: no device node, no mounts; the scratch disk kept its data
        self.flakey.create(NORMAL)
        scenario.mount_upper(self.g, self.flakey.device, self.fs, self.dirs)
        if not scenario.exists(self.g, f"{self.dirs.volatile_dir}/dirty"):
            raise AssertionError(f"{self.label}: after the reboot the upper fs has no "
                                 "work/incompat/volatile/dirty: the disk was not kept")

    def change_work_dir(self) -> None:
        """chmod 0755 workdir/work and give it a default and an access POSIX ACL, as
        something might between two mounts; a harness error if that did not take
        (e.g. an upper fs without ACLs), so a reset check can never pass vacuously."""
        path = self.dirs.work_dir
        try:
            scenario.change_dir_like_a_user(self.g, path)
            mode, acls = scenario.mode_of(self.g, path), scenario.acls_of(self.g, path)
        except errors.GuestCommandFailed as exc:
            raise AssertionError(f"{self.label}: harness error: changing {path} failed: {exc}") from exc
        if mode != "755" or len(acls) != len(scenario.ACL_XATTRS):
            raise AssertionError(f"{self.label}: harness error: after chmod 0755 and setfattr of both ACLs "
                                 f"{path} has mode {mode} and ACL xattrs {acls or 'none'}")

    def inject_writeback_error(self, run: scenario.RowRun, name: str = "victim") -> str:
        """A data-only writeback error on the upper fs, as SCENARIOS.md describes.

        The file is created and preallocated through the overlay and synced with
        the table normal (fsfreeze + thaw: everything written back, journal/log
        idle), then with error_writes it is overwritten in place through the
        overlay and its upper file written back with sync_file_range (checked
        step: it must fail with EIO, proof that the data write failed), then
        the table goes back to normal.  Returns the file's path on the overlay.
        """
        path = f"{self.dirs.target}/{name}"
        upper = f"{self.dirs.upper}/{name}"
        scenario.pwrite(self.g, path, "1m", 0x11, create=True)
        scenario.quiesce(self.g, self.dirs.fs_mount)
        mark = scenario.kmsg_mark(self.g, "inject-wb-error")
        self.flakey.load(ERROR_WRITES)
        try:
            scenario.pwrite(self.g, path, "1m", 0x22)
            self.step(run, "force writeback of upper", lambda: scenario.force_writeback(self.g, upper))
        finally:
            self.flakey.load(NORMAL)
        damage = scenario.fs_damage(scenario.kmsg_since(self.g, mark))
        if damage:
            raise AssertionError(f"{self.label}: the writeback error injection broke the upper fs "
                                 f"itself (a metadata write failed), not just data writeback: "
                                 f"{' | '.join(damage[:4])}")
        return path

    # -- checks the table can ask for --------------------------------------
    def checks(self) -> dict:
        def dirty():
            if not scenario.exists(self.g, f"{self.dirs.volatile_dir}/dirty"):
                return "work/incompat/volatile/dirty does not exist"
            return None

        def checkpoint():
            value = scenario.checkpoint(self.g, self.dirs)
            if value is None:
                return f"{scenario.CHECKPOINT_XATTR} is not set on work/incompat/volatile"
            if not value:
                return f"{scenario.CHECKPOINT_XATTR} on work/incompat/volatile is empty"
            return None

        def files():
            bad = []
            for path, text in self.files.items():
                got = scenario.read_file(self.g, path)
                if got != text:
                    bad.append(f"{path}: {'missing' if got is None else repr(got[:40])}")
            if not self.files:
                return "no files were written to compare (harness bug)"
            return f"files not intact: {', '.join(bad)}" if bad else None

        return {"dirty": dirty, "checkpoint": checkpoint, "files": files, "work-reset": self.work_reset}

    def work_reset(self) -> str | None:
        """Check: workdir/work is as overlayfs makes a new one (mode 000, no POSIX ACL)."""
        path = self.dirs.work_dir
        mode, acls = scenario.mode_of(self.g, path), scenario.acls_of(self.g, path)
        wrong = ([f"mode {mode}, not 0"] if mode != "0" else []) + [f"{name} is still set" for name in acls]
        return f"{path} was not reset: {', '.join(wrong)}" if wrong else None


def _scratch_disk(guest) -> str:
    last = None
    for serial in SCRATCH_SERIALS:
        try:
            return scenario.disk_by_serial(guest, serial)
        except Exception as exc:  # noqa: BLE001 - try the next disk
            last = exc
    raise AssertionError(f"no scratch disk ({', '.join(SCRATCH_SERIALS)}) in the guest: {last}")


@pytest.fixture
def env(request, guest, variant, fs, results_dir, matrix):
    """A fresh dm-flakey device, a freshly made ``fs`` on it, the overlay dirs."""
    if not getattr(matrix, "_booted", None):
        matrix._booted = set()
    if variant not in matrix._booted:
        matrix._booted.add(variant)
        matrix.add_boot(variant, guest.boot_seconds,
                        accel=report.accel_label(guest.plan.spec.accel))
    row = request.node.callspec.params.get("row", "?")
    e = ScenarioEnv(guest, fs, OverlayDirs(), Flakey(guest, _scratch_disk(guest), FLAKEY_NAME),
                    results_dir, f"{row}[{fs}-{variant}]")
    e.fresh()
    yield e
    if e.reboot_seconds:
        matrix.add_boot(variant, e.reboot_seconds)
    e.cleanup()
