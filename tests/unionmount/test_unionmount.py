"""One unionmount-testsuite run (``./run --ov --verify`` or ``--ov --samefs``) on one kernel.

Passes when ./run exits 0 and its mounts could be taken down afterwards; the
kernel-log guard (``klog``) fails it on a splat.  Output in
``<results_dir>/<variant>-<run>.log``.
"""

from __future__ import annotations

import pytest

from vm.suites import fstests

pytestmark = pytest.mark.guest


@pytest.mark.parametrize("run", list(fstests.UNIONMOUNT_RUNS), ids=list(fstests.UNIONMOUNT_RUNS))
def test_unionmount(run, variant, guest, klog, results_dir, settings):
    before = fstests.leftover_mounts(guest.run(["cat", "/proc/mounts"], check=True).stdout)
    assert not before, f"the guest is not clean before the run: mounted {before}"
    res = guest.run(fstests.unionmount_argv(run), timeout=settings.fstests_timeout)
    (results_dir / f"{variant}-{run}.log").write_text(res.stdout + res.stderr)
    left = fstests.leftover_mounts(guest.run(["cat", "/proc/mounts"], check=True).stdout)
    if left:
        guest.run(fstests.unmount_argv(left), timeout=120)
    still = fstests.leftover_mounts(guest.run(["cat", "/proc/mounts"], check=True).stdout)
    assert not still, f"{run} left mounts that could not be taken down: {still}"
    assert res.exit_status == 0, (f"./run {' '.join(fstests.UNIONMOUNT_RUNS[run])} exited "
                                  f"{res.exit_status}:\n{(res.stdout + res.stderr)[-2000:]}")
