"""Every row of SCENARIOS.md, and the extra rows of expectations.json (review
findings of the series beyond SCENARIOS.md), on ext4 and xfs, on each kernel variant.

A row's steps are written once below; what each checked step must return
(and which kernel log line must explain a failure) comes from
``expectations.json`` through :class:`vm.suites.scenario.RowRun`, which raises with
a message naming the row, the step, the outcome and the expectation.
"""

from __future__ import annotations

import pytest

from vm.suites import scenario
from vm.suites.scenario import RowRun

pytestmark = pytest.mark.guest


# --- the rows ------------------------------------------------------------------------

def fresh_volatile(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)


def volatile_to_volatile(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.mount(run, "remount volatile", volatile=True)


def volatile_to_nonvolatile(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.mount(run, "remount plain", volatile=False)


def nonvolatile_to_volatile(env, run: RowRun) -> None:
    env.mount(run, "mount plain", volatile=False)
    env.write_files("p1")
    env.umount_overlay()
    env.mount(run, "remount volatile", volatile=True)


def nonvolatile_to_nonvolatile(env, run: RowRun) -> None:
    env.mount(run, "mount plain", volatile=False)
    env.write_files("p1")
    env.umount_overlay()
    env.mount(run, "remount plain", volatile=False)


def upper_remounted(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.remount_upper()
    env.mount(run, "remount volatile", volatile=True)


def module_reloaded(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.reload_module()
    env.mount(run, "remount volatile", volatile=True)


def rebooted(env, run: RowRun, klog) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.reboot(klog)
    env.mount(run, "remount volatile", volatile=True)


def wb_error_unseen(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.inject_writeback_error(run)
    env.umount_overlay()
    env.mount(run, "remount volatile", volatile=True)


def wb_error_seen(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.inject_writeback_error(run)
    env.umount_overlay()
    # reports the error to us and marks it seen on the upper superblock
    env.step(run, "syncfs upper fs", lambda: scenario.syncfs(env.g, env.dirs.fs_mount))
    env.mount(run, "remount volatile", volatile=True)


def fsync_after_wb_error(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    path = env.inject_writeback_error(run)
    env.step(run, "fsync on overlay 1", lambda: scenario.fsync(env.g, path))
    env.step(run, "fsync on overlay 2", lambda: scenario.fsync(env.g, path))
    env.step(run, "syncfs on overlay", lambda: scenario.syncfs(env.g, env.dirs.target))


def manual_cleanup(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    scenario.remove_tree(env.g, env.dirs.volatile_dir)
    env.mount(run, "remount plain", volatile=False)
    env.umount_overlay()
    env.mount(run, "remount volatile", volatile=True)


def chained_reuse(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    for i in (1, 2, 3):
        env.write_files(f"v{i}")
        env.umount_overlay()
        if not env.mount(run, f"remount volatile {i}", volatile=True).ok:
            return


# --- rows beyond SCENARIOS.md (expectations.json "extra_rows": each says why) ------------

def workdir_in_use(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    # the first overlay stays mounted: its files must still read back afterwards
    env.mount_second(run, "mount volatile on second target", volatile=True)


def work_reset(env, run: RowRun) -> None:
    env.mount(run, "mount volatile", volatile=True)
    env.write_files("v1")
    env.umount_overlay()
    env.change_work_dir()        # chmod 0755 and POSIX ACLs on workdir/work, checked
    env.mount(run, "remount volatile", volatile=True)


ROWS = {
    "fresh-volatile": fresh_volatile,
    "volatile-to-volatile": volatile_to_volatile,
    "volatile-to-nonvolatile": volatile_to_nonvolatile,
    "nonvolatile-to-volatile": nonvolatile_to_volatile,
    "nonvolatile-to-nonvolatile": nonvolatile_to_nonvolatile,
    "upper-remounted": upper_remounted,
    "module-reloaded": module_reloaded,
    "rebooted": rebooted,
    "wb-error-unseen": wb_error_unseen,
    "wb-error-seen": wb_error_seen,
    "fsync-after-wb-error": fsync_after_wb_error,
    "manual-cleanup": manual_cleanup,
    "chained-reuse": chained_reuse,
    # extra rows
    "workdir-in-use": workdir_in_use,
    "work-reset": work_reset,
}
#: rows whose steps need the test's kernel log (to check it before a reboot)
NEEDS_KLOG = {"rebooted"}


# --- the test ---------------------------------------------------------------------------

def test_row(row, fs, variant, kernel, guest, klog, env, matrix, expectations, request):
    """One row of SCENARIOS.md (or an extra row) on one upper filesystem and kernel variant."""
    base = scenario.variant_base(variant) or scenario.base_of_version(kernel.version)
    exp = expectations.get(row, variant, base)
    run = RowRun(exp, fs, env.checks())
    try:
        steps = ROWS.get(row)
        if steps is None:
            raise AssertionError(f"{run.label}: no scenario implements row {row!r} "
                                 "(add it to ROWS in tests/scenarios/test_scenarios.py)")
        if row in NEEDS_KLOG:
            steps(env, run, klog)
        else:
            steps(env, run)
        run.finish()
    finally:
        matrix.record(request.node.nodeid, expected=exp.headline, actual=run.actual_headline,
                      behaviour=exp.behaviour, steps=run.results, message=run.failure or "")
