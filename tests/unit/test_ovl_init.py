"""The guest's PID 1 (vm/machine/guestfs/ovl-init): its helpers, run by a real sh against
stand-in /proc and /sys files (sourced with OVL_INIT_LIB=1, which stops before any mount)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vm.machine import image

pytestmark = pytest.mark.unit

INIT = image.GUESTFS / "ovl-init"
TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 {state} 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0F02000A:0016 0202000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1
"""


def sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", f'OVL_INIT_LIB=1; . "{INIT}"; {script}'], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize(("state", "listens"), [("0A", True), ("01", False)], ids=["listen", "only-established"])
def test_listening_reads_the_socket_table(tmp_path, state, listens):
    table = tmp_path / "tcp"
    table.write_text(TCP.format(state=state))
    assert (sh(f'listening "{table}"').returncode == 0) is listens


def test_sourcing_stops_before_any_mount():
    res = sh("echo sourced")
    assert res.returncode == 0 and res.stdout == "sourced\n" and res.stderr == ""


def test_disk_by_serial_finds_the_device(tmp_path):
    for name, serial in (("vda", "ovlroot"), ("vdb", "ovlmodules\n"), ("vdc", None)):
        (tmp_path / name).mkdir()
        if serial is not None:
            (tmp_path / name / "serial").write_text(serial)
    res = sh(f'disk_by_serial ovlmodules "{tmp_path}" && echo "$disk"')
    assert res.stdout == "/dev/vdb\n" and res.stderr == ""
    assert sh(f'disk_by_serial nosuch "{tmp_path}"').returncode == 1


def test_mount_opts_of_a_mountpoint(tmp_path):
    table = tmp_path / "mounts"
    table.write_text("/dev/root / ext4 rw,relatime 0 0\ndevtmpfs /dev devtmpfs rw,size=1k 0 0\n")
    assert sh(f'mount_opts / "{table}"; echo "$opts"').stdout == "rw,relatime\n"
    assert sh(f'mount_opts /run "{table}"; echo "[$opts]"').stdout == "[]\n"
