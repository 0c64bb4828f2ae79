"""The loop's smoke scenario: is a volatile workdir reusable after umount?"""

import pytest

from vm.suites import scenario
from vm.suites.scenario import OverlayDirs

pytestmark = pytest.mark.guest

#: variant -> outcome of the second volatile mount; the series makes it OK.
SECOND_VOLATILE_MOUNT = {"baseline": "EINVAL", "prefix-1": "EINVAL", "prefix-2": "EINVAL",
                         "prefix-3": "OK", "prefix-4": "OK", "patched": "OK"}


def test_volatile_remount_smoke(guest, variant, klog):
    dirs = OverlayDirs()
    device = scenario.disk_by_serial(guest, "ovlscratch0")
    scenario.fresh_upper(guest, device, "ext4", dirs)

    assert scenario.mount_overlay(guest, dirs, volatile=True) == "OK"
    assert scenario.exists(guest, f"{dirs.volatile_dir}/dirty")
    scenario.sh(guest, ["sh", "-c", 'echo data > "$1/file"', "sh", dirs.target])
    assert scenario.umount_overlay(guest, dirs) == "OK"

    second = scenario.mount_overlay(guest, dirs, volatile=True)
    expected = SECOND_VOLATILE_MOUNT[variant.removesuffix("-debug")]
    assert second == expected, f"second volatile mount: {second.detail or second}, expected {expected}"
    if expected == "EINVAL":
        assert scenario.INCOMPAT_MSG in klog.text()
    else:
        assert scenario.exists(guest, f"{dirs.volatile_dir}/dirty"), "the dirty file must be kept"
        out = guest.run(["cat", f"{dirs.target}/file"], check=True).stdout
        assert out == "data\n"
        assert scenario.umount_overlay(guest, dirs) == "OK"
