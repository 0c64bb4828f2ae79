"""QEMU command lines and the accelerator choice (no guest kernel needed)."""


import pytest

from vm import errors
from vm.machine import qemu

pytestmark = pytest.mark.unit


def spec(tmp_path, accel=None):
    accel = accel or qemu.Accel("tcg", "test", qemu.TCG_FACTOR)
    return qemu.VMSpec(
        arch=qemu.X86_64, kernel=tmp_path / "bzImage",
        root=qemu.Disk(tmp_path / "root.ext4", "ovlroot", snapshot=True),
        modules=qemu.Disk(tmp_path / "mods.ext4", "ovlmodules", snapshot=True),
        scratch=(qemu.Disk(tmp_path / "s0.img", "ovlscratch0"),),
        console_log=tmp_path / "console.log", ssh_port=2222, pubkey_b64="c3NoLWVkMjU1MTk=",
        accel=accel, memory_mb=1024, cpus=2)


def test_argv_is_a_list_with_the_essentials(tmp_path):
    argv = spec(tmp_path).argv()
    assert argv[0] == "qemu-system-x86_64"
    assert all(isinstance(a, str) for a in argv)
    for flag in ("-no-reboot", "-nodefaults", "-kernel"):
        assert flag in argv
    assert argv[argv.index("-m") + 1] == "1024"
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22" in argv, "SSH forwarded on loopback only"
    assert f"file,id=con,path={tmp_path / 'console.log'}" in argv


def test_root_disk_comes_first_and_scratch_is_persistent(tmp_path):
    argv = spec(tmp_path).argv()
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[0].startswith(f"file={tmp_path / 'root.ext4'}") and "snapshot=on" in drives[0]
    assert "snapshot=off" in drives[2], "scratch disks must survive a reboot"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "virtio-blk" in argv[i + 1]]
    assert [d.split("serial=")[1] for d in devices] == ["ovlroot", "ovlmodules", "ovlscratch0"]


def test_cmdline_has_console_init_and_key(tmp_path):
    cmdline = spec(tmp_path).kernel_cmdline()
    assert "console=ttyS0,115200" in cmdline
    assert "init=/sbin/ovl-init" in cmdline and "root=/dev/vda" in cmdline
    assert "ovl.sshkey=c3NoLWVkMjU1MTk=" in cmdline
    assert "panic=-1" in cmdline, "a panic must end QEMU (with -no-reboot), not hang"


@pytest.mark.parametrize("name,expected", [("kvm", ["-accel", "kvm", "-cpu", "host"]),
                                           ("tcg", ["-accel", "tcg,thread=multi", "-cpu", "max"])],
                         ids=["kvm", "tcg"])
def test_accel_args(name, expected):
    assert qemu.Accel(name, "", 1).qemu_args(qemu.X86_64, 2) == expected


def test_probe_image_is_a_multiboot_kernel(tmp_path):
    import struct
    data = qemu.probe_image(tmp_path / "probe.bin").read_bytes()
    magic, flags, checksum = struct.unpack_from("<3I", data)
    assert magic == 0x1BADB002 and (magic + flags + checksum) & 0xFFFFFFFF == 0


def test_probe_uses_the_real_machine_and_cpu(tmp_path):
    argv = qemu.probe_argv(qemu.X86_64, "kvm", tmp_path / "p.bin")
    assert argv[argv.index("-machine") + 1] == qemu.X86_64.machine
    assert argv[argv.index("-cpu") + 1] == qemu.X86_64.kvm_cpu


def test_choose_accel_tcg_requested(tmp_path):
    accel = qemu.choose_accel(qemu.X86_64, "tcg", tmp_path, 5)
    assert accel.name == "tcg" and "requested" in accel.reason


def test_choose_accel_rejects_unknown(tmp_path):
    with pytest.raises(errors.BadArgument):
        qemu.choose_accel(qemu.X86_64, "hvf", tmp_path, 5)


def test_choose_accel_falls_back_when_probe_hangs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(qemu, "kvm_usable", lambda: None)
    monkeypatch.setattr(qemu, "run_probe", lambda argv, timeout: calls.append(argv) or
                        (False, "no output from the guest within 5s (it hangs in firmware)"))
    accel = qemu.choose_accel(qemu.X86_64, "auto", tmp_path, 5)
    assert accel.name == "tcg" and "hangs in firmware" in accel.reason and "TCG" in accel.reason
    again = qemu.choose_accel(qemu.X86_64, "auto", tmp_path, 5)
    assert len(calls) == 1, "the verdict is cached for this host boot"
    assert "cached" in again.reason
    with pytest.raises(errors.AccelUnavailable, match="fix:"):
        qemu.choose_accel(qemu.X86_64, "kvm", tmp_path, 5)


def test_a_kvm_boot_hang_is_remembered(tmp_path, monkeypatch):
    """The probe passes but a real kernel hangs: later boots go straight to TCG."""
    calls = []
    monkeypatch.setattr(qemu, "kvm_usable", lambda: None)
    monkeypatch.setattr(qemu, "run_probe", lambda argv, timeout: calls.append(argv) or (True, "probe printed"))
    assert qemu.choose_accel(qemu.X86_64, "auto", tmp_path, 5).name == "kvm"
    qemu.remember_kvm_failure(qemu.X86_64, tmp_path, 5, "no console output in 15s")
    again = qemu.choose_accel(qemu.X86_64, "auto", tmp_path, 5)
    assert again.name == "tcg" and "hung" in again.reason and "no console output" in again.reason
    assert len(calls) == 1, "no second probe: the boot verdict replaced the probe's"


def test_choose_accel_without_dev_kvm(tmp_path, monkeypatch):
    monkeypatch.setattr(qemu, "kvm_usable", lambda: "/dev/kvm does not exist")
    accel = qemu.choose_accel(qemu.X86_64, "auto", tmp_path, 5)
    assert accel.name == "tcg" and "/dev/kvm does not exist" in accel.reason


def test_real_tcg_probe_runs_guest_code(tmp_path):
    """Start real QEMU (TCG) on the multiboot probe stub: proves the probe itself works."""
    ok, detail = qemu.run_probe(qemu.probe_argv(qemu.X86_64, "tcg", qemu.probe_image(tmp_path / "p.img")), 20)
    assert ok, detail


def test_free_port_is_bindable():
    import socket
    port = qemu.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_boot_plan_round_trips_through_the_detached_state(tmp_path):
    from vm.machine import guest

    plan = guest.BootPlan(spec(tmp_path), tmp_path / "run", tmp_path / "key", "patched", "6.12.117", 360.0,
                          accel_cache=tmp_path / "accel", probe_timeout=10.0)
    assert guest.plan_from_dict(guest.plan_to_dict(plan)) == plan
    old = guest.plan_to_dict(plan)
    del old["accel_cache"], old["probe_timeout"]          # state written before these fields existed
    assert guest.plan_from_dict(old).accel_cache is None
