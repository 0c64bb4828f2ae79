"""The loop's smoke scenario: is a volatile workdir reusable after umount?"""

import pytest

from vm.suites import scenario
from vm.suites.scenario import OverlayDirs

pytestmark = pytest.mark.guest

#: the row of expectations.json this smoke scenario is a short form of
ROW = "volatile-to-volatile"


def second_mount_expectation(expectations, variant: str, kernel_version: str):
    """What the second volatile mount must return on ``variant``: the table's
    ``remount volatile`` step of ROW, with the per-base differences, as test_row reads it."""
    base = scenario.variant_base(variant) or scenario.base_of_version(kernel_version)
    exp = expectations.get(ROW, variant, base)
    steps = [s for s in exp.steps if s.step == "remount volatile"]
    if len(steps) != 1:
        raise AssertionError(f"expectations.json: {ROW}/{exp.behaviour} must have one 'remount volatile' "
                             f"step, has {[s.step for s in exp.steps]} (fix the table or ROW)")
    return steps[0]


def test_volatile_remount_smoke(guest, variant, kernel, klog, expectations):
    want = second_mount_expectation(expectations, variant, kernel.version)
    dirs = OverlayDirs()
    device = scenario.disk_by_serial(guest, "ovlscratch0")
    scenario.fresh_upper(guest, device, "ext4", dirs)

    assert scenario.mount_overlay(guest, dirs, volatile=True) == "OK"
    assert scenario.exists(guest, f"{dirs.volatile_dir}/dirty")
    scenario.sh(guest, ["sh", "-c", 'echo data > "$1/file"', "sh", dirs.target])
    assert scenario.umount_overlay(guest, dirs) == "OK"

    second = scenario.mount_overlay(guest, dirs, volatile=True)
    assert second == want.expect, f"second volatile mount: {second.detail or second}, expected {want.expect}"
    if want.expect != "OK":
        log = klog.text()
        missing = [line for line in want.log if line not in log]
        assert not missing, f"second volatile mount: {second}, but the kernel log lacks {missing}"
    else:
        assert scenario.exists(guest, f"{dirs.volatile_dir}/dirty"), "the dirty file must be kept"
        out = guest.run(["cat", f"{dirs.target}/file"], check=True).stdout
        assert out == "data\n"
        assert scenario.umount_overlay(guest, dirs) == "OK"
