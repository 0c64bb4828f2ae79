"""dm-flakey driver against the fake connection: the exact dmsetup sequence."""

import pytest

from tests.fakes import FakeConnection
from vm import errors
from vm.machine import flakey
from vm.machine.flakey import Flakey
from vm.machine.ssh import CommandResult

pytestmark = pytest.mark.unit

DEV = "/dev/vdc"
NODE = "/dev/mapper/ovl-flakey"
NORMAL = f"0 2097152 flakey {DEV} 0 180 0"
DROP = f"0 2097152 flakey {DEV} 0 0 180 1 drop_writes"
ERROR = f"0 2097152 flakey {DEV} 0 0 180 1 error_writes"


def fake(node_after_mknodes=False, exists=True, mountinfo=""):
    """A guest whose /dev/mapper node appears at create, or only after `dmsetup mknodes`."""
    state = {"node": False, "mknodes": False}

    def create(line):
        state["node"] = not node_after_mknodes
        return None

    def mknodes(line):
        state["node"] = True
        return None

    def test_b(line):
        return 0 if state["node"] else 1

    conn = FakeConnection({
        "blockdev --getsz /dev/vdc": CommandResult("", 0, "2097152\n", ""),
        "dmsetup create": create,
        "dmsetup mknodes": mknodes,
        f"test -b {NODE}": test_b,
        "dmsetup info": lambda line: 0 if exists else 1,
        "cat /proc/self/mountinfo": lambda line: mountinfo,
        "sh -c 'mountpoint -x": lambda line: "253:0\n",
    })
    return conn


def test_tables_match_fstests():
    assert flakey.table("normal", 2097152, DEV) == NORMAL
    assert flakey.table("drop_writes", 2097152, DEV) == DROP
    assert flakey.table("error_writes", 2097152, DEV) == ERROR
    with pytest.raises(ValueError, match="unknown dm-flakey table"):
        flakey.table("bogus", 1, DEV)


def test_create_uses_getsz_and_checks_the_node():
    conn = fake()
    fl = Flakey(conn, DEV).create()
    assert fl.device == NODE
    assert conn.calls == [
        "blockdev --getsz /dev/vdc",
        f"dmsetup create ovl-flakey --table '{NORMAL}'",
        f"test -b {NODE}",
    ]


def test_create_makes_the_node_without_udev():
    conn = fake(node_after_mknodes=True)
    Flakey(conn, DEV).create()
    assert conn.calls[-3:] == [f"test -b {NODE}", "dmsetup mknodes ovl-flakey", f"test -b {NODE}"]


def test_node_that_never_appears_is_an_error():
    conn = fake(node_after_mknodes=True)
    conn.responses["dmsetup mknodes"] = CommandResult("", 0, "", "")   # does nothing
    with pytest.raises(errors.FlakeyError, match="did not appear"):
        Flakey(conn, DEV).create()


@pytest.mark.parametrize("kind,table", [("error_writes", ERROR), ("drop_writes", DROP),
                                        ("normal", NORMAL)])
def test_load_is_suspend_nolockfs_load_resume(kind, table):
    conn = fake()
    fl = Flakey(conn, DEV).create()
    del conn.calls[:]
    fl.load(kind)
    assert conn.calls == [
        "dmsetup suspend --nolockfs ovl-flakey",
        f"dmsetup load ovl-flakey --table '{table}'",
        "dmsetup resume ovl-flakey",
    ]
    assert fl.current == kind


def test_failed_load_resumes_the_old_table():
    conn = fake()
    fl = Flakey(conn, DEV).create()
    conn.responses = {"dmsetup load": CommandResult("", 1, "", "device-mapper: reload ioctl failed"),
                      **conn.responses}
    del conn.calls[:]
    with pytest.raises(errors.FlakeyError, match="reload ioctl failed"):
        fl.load("error_writes")
    assert conn.calls[-1] == "dmsetup resume ovl-flakey"


def test_failed_create_names_the_command():
    conn = fake()
    conn.responses["dmsetup create"] = CommandResult("", 1, "", "Device or resource busy")
    with pytest.raises(errors.FlakeyError, match=r"dmsetup create ovl-flakey .* exited 1.*busy"):
        Flakey(conn, DEV).create()


def test_context_manager_removes_after_unmounting_what_is_on_it():
    mountinfo = (
        "22 1 252:0 / / rw - ext4 /dev/vda rw\n"
        "40 22 253:0 / /mnt/upperfs rw,relatime - xfs /dev/mapper/ovl-flakey rw\n"
        "41 22 0:40 / /mnt/ovl rw - overlay overlay rw,lowerdir=/mnt/upperfs/lower,"
        "upperdir=/mnt/upperfs/upper,workdir=/mnt/upperfs/work,volatile\n"
        "42 22 0:41 / /tmp rw - tmpfs tmpfs rw\n")
    conn = fake(mountinfo=mountinfo)
    with Flakey(conn, DEV) as fl:
        assert fl.device == NODE
        fl.load("error_writes")
        del conn.calls[:]
    assert conn.calls == [
        "dmsetup info ovl-flakey",
        "dmsetup resume ovl-flakey",
        "cat /proc/self/mountinfo",
        f"sh -c 'mountpoint -x \"$1\" 2>/dev/null' sh {NODE}",
        "umount /mnt/ovl",
        "umount /mnt/upperfs",
        "dmsetup remove --retry ovl-flakey",
        "dmsetup mknodes ovl-flakey",
    ]


def test_remove_of_a_missing_device_only_drops_a_stale_node():
    conn = fake(exists=False)
    Flakey(conn, DEV).remove()
    assert conn.calls == ["dmsetup info ovl-flakey", "dmsetup mknodes ovl-flakey"]


def test_mounts_on_finds_the_device_by_number_and_escapes():
    info = ("40 22 253:0 / /mnt/with\\040space rw - ext4 /dev/dm-0 rw\n"
            "41 40 0:50 / /mnt/with\\040space/inner rw - tmpfs tmpfs rw\n"
            "42 22 0:51 / /mnt/other rw - tmpfs tmpfs rw\n")
    assert flakey.mounts_on(info, NODE, "253:0") == ["/mnt/with space/inner", "/mnt/with space"]
    assert flakey.mounts_on(info, NODE, None) == []


def test_mounts_on_finds_two_overlays_over_the_same_dirs():
    # workdir-in-use: should a second overlay over the same dirs get mounted, both go first
    opts = "rw,lowerdir=/mnt/upperfs/lower,upperdir=/mnt/upperfs/upper,workdir=/mnt/upperfs/work,volatile"
    info = ("40 22 253:0 / /mnt/upperfs rw - ext4 /dev/mapper/ovl-flakey rw\n"
            f"41 22 0:40 / /mnt/ovl rw - overlay overlay {opts}\n"
            f"42 22 0:41 / /mnt/ovl2 rw - overlay overlay {opts}\n")
    assert flakey.mounts_on(info, NODE, "253:0") == ["/mnt/ovl2", "/mnt/ovl", "/mnt/upperfs"]
