"""QEMU settings and command lines, and the accelerator probe.

Per-architecture settings are small frozen dataclasses (as in kunit.py's
``qemu_configs``); the command line is built as a list from a frozen
:class:`VMSpec`, so it can be unit-tested without starting anything.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from vm import errors, runner


@dataclass(frozen=True)
class QemuArch:
    name: str
    binary: str
    machine: str
    kvm_cpu: str
    tcg_cpu: str
    console: str
    kernel_image: str              # path of the boot image inside O=
    extra_args: tuple[str, ...] = ()


X86_64 = QemuArch(name="x86_64", binary="qemu-system-x86_64", machine="q35", kvm_cpu="host",
                  tcg_cpu="max", console="ttyS0", kernel_image="arch/x86/boot/bzImage")

ARCHES = {"x86_64": X86_64}


@dataclass(frozen=True)
class Accel:
    name: str                # "kvm" or "tcg"
    reason: str              # why this one was picked, shown to the user
    timeout_factor: float    # how much slower than KVM to expect

    def qemu_args(self, arch: QemuArch, cpus: int) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", arch.kvm_cpu]
        threads = "multi" if cpus > 1 else "single"
        return ["-accel", f"tcg,thread={threads}", "-cpu", arch.tcg_cpu]


KVM_FACTOR = 1.0
TCG_FACTOR = 6.0


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    snapshot: bool = False        # True: writes go to a throw-away overlay
    readonly: bool = False

    def qemu_args(self, index: int) -> list[str]:
        opts = [f"file={self.path}", "format=raw", "if=none", f"id=disk{index}",
                f"snapshot={'on' if self.snapshot else 'off'}", "cache=unsafe" if not self.readonly else "cache=none"]
        if self.readonly:
            opts.append("readonly=on")
        return ["-drive", ",".join(opts),
                "-device", f"virtio-blk-pci,drive=disk{index},serial={self.serial}"]


@dataclass(frozen=True)
class VMSpec:
    arch: QemuArch
    kernel: Path
    root: Disk
    modules: Disk
    scratch: tuple[Disk, ...]
    console_log: Path
    ssh_port: int
    pubkey_b64: str
    accel: Accel
    memory_mb: int = 2048
    cpus: int = 2
    cmdline_extra: tuple[str, ...] = field(default_factory=tuple)
    #: further disks after the scratch disks (a test suite's tree, e.g. fstests)
    extra: tuple[Disk, ...] = ()

    def kernel_cmdline(self) -> str:
        parts = [f"console={self.arch.console},115200", "root=/dev/vda", "rootfstype=ext4", "rw",
                 "init=/sbin/ovl-init", "panic=-1", "loglevel=6", "net.ifnames=0",
                 f"ovl.sshkey={self.pubkey_b64}", *self.cmdline_extra]
        return " ".join(parts)

    def argv(self) -> list[str]:
        args = [self.arch.binary, "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-machine", self.arch.machine,
                *self.accel.qemu_args(self.arch, self.cpus),
                "-smp", str(self.cpus), "-m", str(self.memory_mb),
                "-kernel", str(self.kernel), "-append", self.kernel_cmdline(),
                "-chardev", f"file,id=con,path={self.console_log}", "-serial", "chardev:con",
                "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=net0",
                "-device", "virtio-rng-pci",
                *self.arch.extra_args]
        # The root disk must be the first virtio disk: root=/dev/vda.
        for index, disk in enumerate((self.root, self.modules, *self.scratch, *self.extra)):
            args += disk.qemu_args(index)
        return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- accelerator probe -------------------------------------------------------

#: A minimal multiboot (v1) kernel, loaded by QEMU's -kernel path like the
#: real bzImage: it writes "OK\n" to COM1 and halts.  If the firmware and the
#: accelerator get that far, the guest runs code; if not, it hangs or dies.
_MB_MAGIC, _MB_FLAGS, _MB_LOAD = 0x1BADB002, 0x00010000, 0x100000
_PROBE_CODE = bytes([
    0x66, 0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    0xB0, 0x4F, 0xEE,        # mov al, 'O'; out dx, al
    0xB0, 0x4B, 0xEE,        # mov al, 'K'; out dx, al
    0xB0, 0x0A, 0xEE,        # mov al, '\n'; out dx, al
    0xF4,                    # hlt
    0xEB, 0xFD,              # jmp hlt
])


def probe_kernel_bytes() -> bytes:
    header = struct.pack("<8I", _MB_MAGIC, _MB_FLAGS, (-(_MB_MAGIC + _MB_FLAGS)) & 0xFFFFFFFF,
                         _MB_LOAD, _MB_LOAD, 0, 0, _MB_LOAD + 32)
    return header + _PROBE_CODE


def probe_image(path: Path) -> Path:
    data = probe_kernel_bytes()
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def probe_argv(arch: QemuArch, accel: str, image: Path) -> list[str]:
    """The probe runs the machine type and CPU model of the real boot: a
    host where KVM only works for some combinations must not pass it."""
    cpu = arch.kvm_cpu if accel == "kvm" else arch.tcg_cpu
    return [arch.binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", arch.machine, "-accel", accel, "-cpu", cpu, "-m", "32",
            "-kernel", str(image), "-serial", "stdio"]


def run_probe(argv: list[str], timeout: float) -> tuple[bool, str]:
    """Start QEMU, wait up to ``timeout`` s for "OK" on the serial port, kill it."""
    runner.announce(argv)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
    except OSError as exc:
        return False, f"cannot start {argv[0]}: {exc}"
    seen = b""
    try:
        assert proc.stdout is not None
        while time.monotonic() - start < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
                if b"OK" in seen:
                    return True, f"guest code ran after {time.monotonic() - start:.1f}s"
            if proc.poll() is not None:
                break
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
            return False, f"QEMU exited {proc.returncode}: {runner.tail(err, 2) or 'no message'}"
        return False, f"no output from the guest within {timeout:.0f}s (it hangs in firmware)"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open /dev/kvm ({exc.strerror})"
    os.close(fd)
    return None


def host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def choose_accel(arch: QemuArch, wanted: str, cache_dir: Path, probe_timeout: float) -> Accel:
    """Pick KVM or TCG and say why.  ``wanted`` is "auto", "kvm" or "tcg".

    The probe verdict is cached per host boot and QEMU binary, so only the
    first boot of a host boot pays for it.
    """
    runner.require(arch.binary, "qemu-system-x86")
    if wanted == "tcg":
        return Accel("tcg", "TCG requested (accel=tcg)", TCG_FACTOR)
    if wanted not in ("auto", "kvm"):
        raise errors.BadArgument(what=f"unknown accelerator {wanted!r}", fix="use auto, kvm or tcg")
    why_not = kvm_usable()
    if why_not is None:
        verdict_file = cache_dir / VERDICT_FILE
        stamp = _probe_stamp(arch, probe_timeout)
        cached = _read_json(verdict_file)
        if cached.get("stamp") == stamp:
            ok, detail = cached["ok"], cached["detail"] + " (cached verdict from this host boot)"
        else:
            ok, detail = run_probe(probe_argv(arch, "kvm", probe_image(cache_dir / "probe-multiboot.bin")),
                                   probe_timeout)
            _write_json(verdict_file, {"stamp": stamp, "ok": ok, "detail": detail})
        if ok:
            return Accel("kvm", f"KVM probe passed: {detail}", KVM_FACTOR)
        why_not = f"KVM probe failed: {detail}"
    if wanted == "kvm":
        raise errors.AccelUnavailable(reason=why_not,
                                      fix="use --accel auto or tcg, or fix KVM on this host")
    return Accel("tcg", f"{why_not}; falling back to TCG (software emulation, slower)", TCG_FACTOR)


VERDICT_FILE = "accel-probe.json"


def _probe_stamp(arch: QemuArch, probe_timeout: float) -> dict:
    return {"boot_id": host_boot_id(), "qemu": str(Path(runner.require(arch.binary)).resolve()),
            "timeout": probe_timeout}


def remember_kvm_failure(arch: QemuArch, cache_dir: Path, probe_timeout: float, detail: str) -> None:
    """A real kernel hung under KVM although the probe passed: use TCG for the rest of this host boot.

    Without this every boot would pay the KVM attempt again before falling back.
    """
    _write_json(cache_dir / VERDICT_FILE, {"stamp": _probe_stamp(arch, probe_timeout), "ok": False,
                                           "detail": f"a kernel booted under KVM hung ({detail})"})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
