"""Scenario steps against the fake connection (no VM)."""

import errno

import pytest

from tests.fakes import FakeConnection
from vm import errors
from vm.suites import scenario

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("stdout,status,expected", [
    ("ok\n", 0, "OK"),
    ("errno=22 EINVAL: Invalid argument\n", 1, "EINVAL"),
    ("errno=5 EIO: Input/output error\n", 1, "EIO"),
], ids=["ok", "einval", "eio"])
def test_parse_outcome(stdout, status, expected):
    out = scenario.parse_outcome(stdout, status)
    assert out == expected and str(out) == expected


def test_parse_outcome_without_verdict_is_an_error():
    with pytest.raises(errors.GuestCommandFailed, match="no verdict"):
        scenario.parse_outcome("usage: ...", 2)


def test_outcome_equality():
    assert scenario.Outcome(errno.EINVAL) == scenario.Outcome(errno.EINVAL, "x")
    assert scenario.Outcome(errno.EINVAL) != "OK"
    assert scenario.OK.ok


def test_mount_overlay_sends_exact_syscall():
    fake = FakeConnection()
    fake.expect("/usr/local/bin/ovl-syscall mount", 1, "errno=22 EINVAL: Invalid argument\n")
    dirs = scenario.OverlayDirs()
    assert scenario.mount_overlay(fake, dirs, volatile=True) == "EINVAL"
    assert fake.calls[-1] == ("/usr/local/bin/ovl-syscall mount overlay /mnt/ovl overlay "
                              "lowerdir=/mnt/upperfs/lower,upperdir=/mnt/upperfs/upper,"
                              "workdir=/mnt/upperfs/work,volatile")


def test_kmsg_since_returns_lines_after_marker():
    fake = FakeConnection()
    marker = scenario.kmsg_mark(fake, "t1")
    fake.expect("dmesg", 0, f"[1] old\n[2] {marker}\n[3] overlay: new\n")
    assert scenario.kmsg_since(fake, marker) == ["[3] overlay: new"]


def test_fresh_upper_makes_fs_and_dirs():
    fake = FakeConnection()
    scenario.fresh_upper(fake, "/dev/vdc", "xfs", scenario.OverlayDirs())
    assert "mkfs.xfs -q -f /dev/vdc" in fake.calls
    assert "mount -t xfs /dev/vdc /mnt/upperfs" in fake.calls
