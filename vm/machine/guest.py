"""A booted QEMU guest: start, wait for SSH, stop, reboot, attach.

No QEMU process outlives a failure: a foreground guest is started with
``PR_SET_PDEATHSIG`` so it dies with the harness even on ``kill -9``, and
every failure path in :meth:`Guest.boot` stops it before raising.  A
detached guest (``invoke boot --detach``) records itself in ``guest.json``
in its run dir so ``invoke ssh``/``stop`` and the pytest fixture find it.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vm import errors, runner
from vm.kernel.build import Kernel
from vm.machine import console, qemu
from vm.machine.image import Image
from vm.machine.ssh import GuestConnection, ensure_keypair
from vm.settings import Settings

STATE_FILE = "guest.json"
#: seconds a KVM guest may stay silent before we decide it hangs in firmware
KVM_FIRST_OUTPUT = 15.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class BootPlan:
    """Everything needed to (re)start the same guest."""

    spec: qemu.VMSpec
    run_dir: Path
    key_path: Path
    kernel_label: str
    kernel_release: str
    boot_timeout: float
    #: where the KVM/TCG verdict is cached, so a KVM hang is remembered (see qemu.choose_accel)
    accel_cache: Path | None = None
    probe_timeout: float = 0.0


def plan(settings: Settings, kernel: Kernel, image: Image, run_dir: Path,
         accel: qemu.Accel | None = None) -> BootPlan:
    arch = qemu.ARCHES[settings.arch]
    run_dir.mkdir(parents=True, exist_ok=True)
    key_path, pubkey = ensure_keypair(settings.sub("ssh"))
    if accel is None:
        accel = qemu.choose_accel(arch, settings.accel, settings.sub("accel"),
                                  settings.kvm_probe_timeout)
    scratch = []
    for i in range(settings.scratch_disks):
        path = run_dir / f"scratch{i}.img"
        if not path.exists():
            with open(path, "wb") as fh:
                fh.truncate(settings.scratch_size_mb * 1024 * 1024)
        scratch.append(qemu.Disk(path, f"ovlscratch{i}"))
    spec = qemu.VMSpec(
        arch=arch, kernel=kernel.bzimage,
        root=qemu.Disk(image.path, "ovlroot", snapshot=True),
        modules=qemu.Disk(kernel.modules_img, "ovlmodules", snapshot=True),
        scratch=tuple(scratch), console_log=run_dir / "console.log",
        ssh_port=qemu.free_port(),
        pubkey_b64=base64.b64encode(pubkey.encode()).decode(),
        accel=accel, memory_mb=settings.memory_mb, cpus=settings.cpus)
    return BootPlan(spec, run_dir, key_path, kernel.label, kernel.release,
                    settings.boot_timeout * accel.timeout_factor,
                    accel_cache=settings.sub("accel"), probe_timeout=settings.kvm_probe_timeout)


class Guest:
    """A running guest.  ``with Guest.boot(plan) as g: g.run([...])``."""

    def __init__(self, plan: BootPlan, pid: int, proc: subprocess.Popen | None,
                 detached: bool) -> None:
        self.plan = plan
        self.pid = pid
        self.proc = proc
        self.detached = detached
        self.conn = GuestConnection("127.0.0.1", plan.spec.ssh_port, key_path=plan.key_path,
                                    command_timeout=max(300.0, plan.boot_timeout))
        self.boot_seconds = 0.0

    # --- lifecycle -------------------------------------------------------
    @classmethod
    def boot(cls, plan: BootPlan, *, detach: bool = False) -> "Guest":
        runner.echo(f"  accelerator: {plan.spec.accel.name} ({plan.spec.accel.reason})")
        guest = cls._start(plan, detach)
        try:
            guest._wait_ready()
        except errors.KvmHang as exc:
            guest.stop()
            detail = _tail_file(plan.run_dir / 'qemu.log') or str(exc)
            runner.echo(f"  KVM guest died or printed nothing ({detail}); falling back to TCG "
                        "(remembered until the host reboots)")
            if plan.accel_cache is not None:
                qemu.remember_kvm_failure(plan.spec.arch, plan.accel_cache, plan.probe_timeout, detail)
            tcg = qemu.Accel("tcg", "the KVM guest did not start the kernel; using TCG",
                             qemu.TCG_FACTOR)
            plan = replace(plan, spec=replace(plan.spec, accel=tcg),
                           boot_timeout=plan.boot_timeout / plan.spec.accel.timeout_factor * tcg.timeout_factor)
            return cls.boot(plan, detach=detach)
        except BaseException:
            guest.stop()
            raise
        return guest

    @classmethod
    def _start(cls, plan: BootPlan, detach: bool) -> "Guest":
        spec = plan.spec
        spec.console_log.write_text("")
        argv = spec.argv()
        runner.announce(argv)
        qemu_log = plan.run_dir / "qemu.log"
        with open(qemu_log, "w") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=detach,
                                    preexec_fn=None if detach else _die_with_parent)
        guest = cls(plan, proc.pid, proc, detach)
        if detach:
            guest.save_state()
        return guest

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_is_qemu(self.pid, self.plan.run_dir)

    def _console_problem(self, lines: list[str]) -> str | None:
        for line in lines:
            event = console.classify(line)
            if event in (console.Event.PANIC, console.Event.INIT_FAILED):
                return f"{event.value}: {line.strip()}"
        if not self._alive():
            return f"QEMU exited ({_tail_file(self.plan.run_dir / 'qemu.log')})"
        return None

    def _wait_ready(self) -> None:
        start = time.monotonic()
        deadline = start + self.plan.boot_timeout
        kvm = self.plan.spec.accel.name == "kvm"
        seen_output = False
        lines: list[str] = []
        try:
            for line in console.follow(self.plan.spec.console_log, deadline=deadline, alive=self._alive):
                lines.append(line)
                seen_output = seen_output or bool(line.strip())
                event = console.classify(line)
                if event is console.Event.READY:
                    break
                if event in (console.Event.PANIC, console.Event.INIT_FAILED):
                    time.sleep(0.5)
                    self._fail(f"{event.value}: {line.strip()}", "read the console log; "
                               "check the kernel config and the root image")
                if kvm and not seen_output and time.monotonic() - start > KVM_FIRST_OUTPUT:
                    raise errors.KvmHang(seconds=KVM_FIRST_OUTPUT)
            else:
                if kvm and not seen_output:
                    raise errors.KvmHang(seconds=time.monotonic() - start)
                self._fail(f"QEMU exited during boot ({_tail_file(self.plan.run_dir / 'qemu.log')})",
                           "read the console and qemu logs")
        except errors.ConsoleTimeout:
            if kvm and not seen_output:
                raise errors.KvmHang(seconds=self.plan.boot_timeout) from None
            self._fail(f"did not finish booting in {self.plan.boot_timeout:.0f}s",
                       "raise ovl.boot_timeout or check the console log")
        remaining = max(10.0, deadline - time.monotonic())

        def abort() -> str | None:
            return self._console_problem(console.last_lines(self.plan.spec.console_log, 40))

        self.conn.wait_until_up(remaining, abort=abort)
        self.boot_seconds = time.monotonic() - start
        runner.echo(f"  guest up: {self.plan.kernel_release} ({self.plan.kernel_label}) on "
                    f"127.0.0.1:{self.plan.spec.ssh_port} in {self.boot_seconds:.1f}s "
                    f"[{self.plan.spec.accel.name}]")

    def _fail(self, reason: str, fix: str) -> None:
        tail = " | ".join(console.last_lines(self.plan.spec.console_log, 6))
        raise errors.GuestBootFailed(reason=reason, fix=fix,
                                     console=f"{self.plan.spec.console_log}: ...{tail[-600:]}")

    def stop(self) -> bool:
        """Idempotent: end QEMU (SIGTERM, then SIGKILL) and forget the state.
        True if a running QEMU was stopped."""
        self.conn.close()
        was_running = self._alive()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        elif _pid_is_qemu(self.pid, self.plan.run_dir):
            os.kill(self.pid, signal.SIGTERM)
            for _ in range(100):
                if not _pid_is_qemu(self.pid, self.plan.run_dir):
                    break
                time.sleep(0.1)
            else:
                os.kill(self.pid, signal.SIGKILL)
        (self.plan.run_dir / STATE_FILE).unlink(missing_ok=True)
        return was_running

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def reboot(self) -> None:
        """Reboot keeping the scratch disks: the guest's reboot ends QEMU
        (-no-reboot), then the same plan starts again."""
        # The image has no init system to ask: sysrq-b reboots at once.  It
        # runs in the background, so this command returns before the guest
        # goes away; a connection that drops anyway is what we asked for.
        try:
            self.conn.run(["sh", "-c", "sync; setsid sh -c 'sleep 1; echo b > /proc/sysrq-trigger' "
                                       "</dev/null >/dev/null 2>&1 &"], timeout=10)
        except (errors.SSHUnreachable, errors.GuestCommandTimeout):
            pass
        deadline = time.monotonic() + 30 * self.plan.spec.accel.timeout_factor
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.stop()
        fresh = Guest.boot(self.plan, detach=self.detached)
        self.pid, self.proc, self.conn = fresh.pid, fresh.proc, fresh.conn
        self.boot_seconds = fresh.boot_seconds

    # --- commands --------------------------------------------------------
    def run(self, cmd, **kwargs):
        return self.conn.run(cmd, **kwargs)

    # --- detached state --------------------------------------------------
    def save_state(self) -> None:
        state = {"pid": self.pid, "argv": self.plan.spec.argv(), "plan": plan_to_dict(self.plan)}
        path = self.plan.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)


def plan_to_dict(plan: BootPlan) -> dict:
    return json.loads(json.dumps(asdict(plan), default=str))


def plan_from_dict(data: dict) -> BootPlan:
    spec = dict(data["spec"])
    arch = qemu.QemuArch(**{**spec["arch"], "extra_args": tuple(spec["arch"]["extra_args"])})

    def disk(d: dict) -> qemu.Disk:
        return qemu.Disk(Path(d["path"]), d["serial"], d["snapshot"], d["readonly"])

    vm = qemu.VMSpec(arch=arch, kernel=Path(spec["kernel"]), root=disk(spec["root"]),
                     modules=disk(spec["modules"]), scratch=tuple(disk(d) for d in spec["scratch"]),
                     console_log=Path(spec["console_log"]), ssh_port=int(spec["ssh_port"]),
                     pubkey_b64=spec["pubkey_b64"], accel=qemu.Accel(**spec["accel"]),
                     memory_mb=int(spec["memory_mb"]), cpus=int(spec["cpus"]),
                     cmdline_extra=tuple(spec["cmdline_extra"]))
    return BootPlan(spec=vm, run_dir=Path(data["run_dir"]), key_path=Path(data["key_path"]),
                    kernel_label=data["kernel_label"], kernel_release=data["kernel_release"],
                    boot_timeout=float(data["boot_timeout"]),
                    accel_cache=Path(data["accel_cache"]) if data.get("accel_cache") else None,
                    probe_timeout=float(data.get("probe_timeout", 0.0)))


def attach(run_dir: Path) -> Guest:
    """The detached guest recorded in ``run_dir``, as a :class:`Guest` (it
    can be used, rebooted and stopped like one this process started)."""
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
        plan = plan_from_dict(state["plan"])
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        raise errors.GuestNotRunning(reason=f"no usable state in {path}") from None
    if not _pid_is_qemu(pid, run_dir):
        path.unlink(missing_ok=True)
        raise errors.GuestNotRunning(reason=f"QEMU pid {pid} from {path} has exited")
    return Guest(plan, pid, None, detached=True)


def _pid_is_qemu(pid: int, run_dir: Path) -> bool:
    """True if ``pid`` is a live QEMU started for ``run_dir`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return "qemu-system" in cmdline and str(run_dir) in cmdline


def _tail_file(path: Path) -> str:
    return " | ".join(console.last_lines(path, 3)) or "no output"
