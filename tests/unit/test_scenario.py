"""Scenario steps against the fake connection (no VM)."""

import errno
import shlex
import subprocess

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


def test_new_upper_is_four_round_trips_in_order():
    """umount sweep, mkfs, mountpoints + mount, overlay dirs: batched, in this order."""
    fake = FakeConnection()
    dirs = scenario.OverlayDirs()
    scenario.new_upper(fake, "/dev/mapper/ovl-flakey", "ext4", dirs)
    assert len(fake.calls) == 4
    sweep, mkfs, mount, mkdirs = (shlex.split(c) for c in fake.calls)
    assert sweep[:3] == ["sh", "-c", scenario.UMOUNT_ALL] and sweep[4:] == [dirs.target, dirs.second_target,
                                                                             dirs.fs_mount]
    assert mkfs == ["mkfs.ext4", "-q", "-F", "/dev/mapper/ovl-flakey"]
    assert mount[4:7] == [dirs.fs_mount, dirs.target, dirs.second_target]
    assert mount[7:] == ["-t", "ext4", "-o", "lazytime,noinit_itable", "/dev/mapper/ovl-flakey", dirs.fs_mount]
    assert mkdirs[4:] == [dirs.lower, dirs.upper, dirs.work] and "from-lower" in mkdirs[2]


def test_batched_guest_scripts_do_what_they_say(tmp_path):
    """The batched snippets, run by a real sh with stand-in mount tools: every path swept in
    order, a failing mkdir stops the mount."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    state = tmp_path / "mounted"
    state.write_text("/a\n/a\n/c\n")
    (bin_dir / "mountpoint").write_text(f'#!/bin/sh\ngrep -qx "$2" {state}\n')
    (bin_dir / "umount").write_text(f'#!/bin/sh\necho "umount $1" >> {log}\n'
                                    f'sed -i "0,\\|^$1$|{{\\|^$1$|d}}" {state}\n')
    (bin_dir / "mount").write_text(f'#!/bin/sh\necho "mount $*" >> {log}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["sh", "-c", scenario.UMOUNT_ALL, "sh", "/a", "/b", "/c"], env=env, check=True)
    assert log.read_text().splitlines() == ["umount /a", "umount /a", "umount /c"]
    assert state.read_text() == ""
    log.write_text("")
    (tmp_path / "file").write_text("")
    script = 'mkdir -p "$1" "$2" "$3" && shift 3 && exec mount "$@"'
    bad = subprocess.run(["sh", "-c", script, "sh", str(tmp_path / "file" / "x"), str(tmp_path / "t"),
                          str(tmp_path / "t2"), "-t", "ext4", "/dev/x", "/m"], env=env)
    assert bad.returncode != 0 and log.read_text() == ""
    subprocess.run(["sh", "-c", script, "sh", str(tmp_path / "m"), str(tmp_path / "t"), str(tmp_path / "t2"),
                    "-t", "ext4", "/dev/x", "/m"], env=env, check=True)
    assert log.read_text() == "mount -t ext4 /dev/x /m\n" and (tmp_path / "t2").is_dir()
