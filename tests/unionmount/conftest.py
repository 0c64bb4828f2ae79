"""unionmount-testsuite on booted guests: ``test_unionmount[patched-ov-verify]``.

Each variant gets a fresh guest of its own (the suite image and the
unionmount-testsuite disk, ``--suite-disk unionmount=PATH``); after every run
the suite's mounts (/lower, /upper, /base, /mnt) are taken down and checked
gone, so the next run, or a later suite, starts clean.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vm import pipeline
from vm.machine.image import Image
from vm.suites import fstests, report, scenario

SUITE = "unionmount"


@pytest.fixture(scope="session")
def guest_image(request, settings):
    given = request.config.getoption("--image")
    if given:
        return Image(Path(given), "given")
    return pipeline.guest_image(settings, settings.suite_packages)


@pytest.fixture(scope="session")
def guest(request, variant, kernel, guest_image, settings, results_dir):
    disks = {}
    for item in request.config.getoption("--suite-disk"):
        name, _, path = item.partition("=")
        disks[name] = Path(path)
    if SUITE not in disks:
        raise pytest.UsageError("no --suite-disk unionmount=PATH given")
    g = pipeline.boot_suite_guest(settings, kernel, guest_image, {SUITE: disks[SUITE]})
    report.record_accel(results_dir, variant, report.accel_label(g.plan.spec.accel))
    try:
        disk = scenario.disk_by_serial(g, fstests.UNIONMOUNT_SERIAL)
        g.run(["sh", "-c", f"mkdir -p {fstests.UNIONMOUNT_DIR} && mount {disk} {fstests.UNIONMOUNT_DIR}"],
              check=True)
        yield g
    finally:
        shutil.copy2(g.plan.spec.console_log, results_dir / f"console-{kernel.label}.log")
        g.stop()
        g.release()
