"""fstests ``./check -overlay`` on booted guests in batch mode, one pytest case per test.

Ids read ``test_fstests[overlay/118-xfs-patched]``: test x base fs come from
``--fstests-test`` and ``--fs``, the kernel is the session's ``variant``.  The
guest is this directory's own (``guest`` below): the suite image
(``ovl.suite_packages``), large sparse TEST/SCRATCH disks and the fstests disk
(``--suite-disk fstests=PATH``, a snapshot: writable, thrown away).  The first case
of a (kernel, fs) runs every test of the session in one background ``./check``
(:class:`vm.suites.fstests_batch.Batch`); each case then reports its test's verdict.
A test that hangs past ``ovl.fstests_timeout`` (from its own start) kills the guest,
which boots again for the tests not run yet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vm import pipeline
from vm.machine import console
from vm.machine import guest as guest_mod
from vm.machine.image import Image
from vm.suites import fstests, report, scenario
from vm.suites import fstests_batch as fstests_batch_mod

SUITE = "fstests"


def suite_disks(config) -> dict[str, Path]:
    found = {}
    for item in config.getoption("--suite-disk"):
        name, sep, path = item.partition("=")
        if not sep:
            raise pytest.UsageError(f"--suite-disk {item!r}: expected NAME=PATH")
        found[name] = Path(path)
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    if "fstest" in metafunc.fixturenames:
        tests = metafunc.config.getoption("--fstests-test")
        metafunc.parametrize("fstest", tests, ids=tests)
    if "fs" in metafunc.fixturenames:
        wanted = metafunc.config.getoption("--fs") or list(fstests.FILESYSTEMS)
        unknown = sorted(set(wanted) - set(fstests.FILESYSTEMS))
        if unknown:
            raise pytest.UsageError(f"--fs {', '.join(unknown)}: use {', '.join(fstests.FILESYSTEMS)}")
        metafunc.parametrize("fs", wanted, ids=wanted)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    # one boot per variant, one mkfs per (variant, fs): group the items so
    order: dict[tuple, int] = {}

    def rank(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        v = order.setdefault(("v", params.get("variant")), len(order))
        return (v, params.get("fs", ""))

    items[:] = sorted(items, key=rank)


@pytest.fixture(scope="session")
def guest_image(request, settings):
    given = request.config.getoption("--image")
    if given:
        return Image(Path(given), "given")
    return pipeline.guest_image(settings, settings.suite_packages)


@pytest.fixture(scope="session")
def guest(request, variant, kernel, guest_image, settings, results_dir):
    """A fresh guest of ``kernel`` for the suite (never a detached one: a clean guest)."""
    disks = suite_disks(request.config)      # fstests', and unionmount-testsuite's for overlay/union
    if SUITE not in disks:
        raise pytest.UsageError("no --suite-disk fstests=PATH given")
    g = pipeline.boot_suite_guest(settings, kernel, guest_image, disks)
    report.record_accel(results_dir, variant, report.accel_label(g.plan.spec.accel))
    g.suite_disks = tuple(disks)
    g.suite_state = {}
    g.fstests_batches = {}
    try:
        yield g
    finally:
        shutil.copy2(g.plan.spec.console_log, results_dir / f"console-{kernel.label}.log")
        g.stop()
        g.release()


class HungGuest:
    """What a test does with a guest that stopped answering."""

    def __init__(self, g) -> None:
        self.g = g

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(console.last_lines(self.g.plan.spec.console_log, lines))

    def restart(self) -> None:
        """Kill QEMU and boot the same plan again (the disks are prepared again)."""
        g = self.g
        g.stop()
        fresh = guest_mod.Guest.boot(g.plan, detach=False)
        g.plan, g.pid, g.proc, g.conn = fresh.plan, fresh.pid, fresh.proc, fresh.conn
        g.suite_state = {}

    def alive(self) -> bool:
        return self.g._alive()


@pytest.fixture
def hung_guest(guest) -> HungGuest:
    return HungGuest(guest)


def prepare_fs(guest, fs: str, mount_options: str) -> None:
    """The guest ready for ``./check -overlay`` on base fs ``fs``: the suite disks
    mounted (once per boot: fstests', and unionmount-testsuite's when the guest has it),
    the mounts of an earlier fs released (checked), fresh TEST/SCRATCH filesystems,
    ``local.config``."""
    state = guest.suite_state
    test_dev = scenario.disk_by_serial(guest, "ovlscratch0")
    scratch_dev = scenario.disk_by_serial(guest, "ovlscratch1")
    if not state.get("mounted"):
        union = "unionmount" in guest.suite_disks
        mounts = [(fstests.FSTESTS_SERIAL, fstests.FSTESTS_DIR)]
        mounts += [(fstests.UNIONMOUNT_SERIAL, fstests.UNIONMOUNT_DIR)] if union else []
        for serial, where in mounts:
            disk = scenario.disk_by_serial(guest, serial)
            guest.run(["sh", "-c", f"mkdir -p {where} && mount {disk} {where}"], check=True)
        state["unionmount"] = fstests.UNIONMOUNT_DIR if union else ""
        state["mounted"] = True
    fstests.release_mounts(guest, fs)
    guest.run(fstests.prepare_argv(fs, test_dev, scratch_dev), check=True, timeout=600)
    guest.conn.put_text(f"{fstests.FSTESTS_DIR}/local.config",
                        fstests.local_config(fs, test_dev, scratch_dev, mount_options, state["unionmount"]))
    state["fs"] = fs


@pytest.fixture
def fstests_batch(request, guest, fs, variant, settings, results_dir, hung_guest) -> dict:
    """``{test: Outcome}`` of every ``--fstests-test`` on ``fs``: the first case of the
    (kernel, fs) runs the batch, the others read it (a batch that broke fails them all)."""
    batches = guest.fstests_batches
    if fs not in batches:
        opts = request.config.getoption("--fstests-mount-options")
        batch = fstests_batch_mod.Batch(
            guest, request.config.getoption("--fstests-test"), fs, results_dir / f"{variant}-{fs}",
            timeout=settings.fstests_timeout, prepare=lambda: prepare_fs(guest, fs, opts),
            restart=hung_guest.restart, console_tail=hung_guest.console_tail, alive=hung_guest.alive,
            find_splats=console.find_splats)
        try:
            batches[fs] = batch.run()
        except Exception as exc:     # noqa: BLE001 - every case of this fs reports it
            batches[fs] = exc
    if isinstance(batches[fs], Exception):
        raise batches[fs]
    return batches[fs]
