"""A booted QEMU guest: start, wait for SSH, stop, reboot, attach.

No QEMU process outlives a failure: a foreground guest is started with
``PR_SET_PDEATHSIG`` so it dies with the harness even on ``kill -9``, and
every failure path in :meth:`Guest.boot` stops it before raising.  A
detached guest (``invoke boot --detach``) records itself in ``guest.json``
in its run dir so ``invoke ssh``/``stop`` and the pytest fixture find it.

Every guest has its own run dir, ``<cache>/run/<label>-<pid>-<tag>/``
(:func:`new_run_dir`): console log, QEMU log, scratch disks, state.  Its
``lock`` file is flocked by the harness process using the guest (booting it,
or running tests on it), so two harness runs never share a run dir, scratch
disk or console log, and a detached guest is reused by a test session only
while no other session uses it (:func:`claim`).  Run dirs whose lock is free
and whose QEMU is gone are pruned (the newest one of each label is kept, so
its logs can still be read).  The SSH port is chosen free and bound by QEMU a
moment later; if another process took it meanwhile, QEMU exits at once and
the boot retries with another port.
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vm import errors, runner
from vm.kernel.build import Kernel
from vm.machine import console, qemu
from vm.machine.image import Image
from vm.machine.ssh import GuestConnection, ensure_keypair, record_timing
from vm.settings import Settings

STATE_FILE = "guest.json"
LOCK_FILE = "lock"
#: ``<label>-<pid>-<tag>``: the run dirs :func:`new_run_dir` makes (and prunes)
RUN_DIR_NAME = re.compile(r"^(?P<label>.+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{6})$")
#: how often a boot picks another SSH port when QEMU cannot bind the chosen one
PORT_TRIES = 4
BIND_FAILED = "Could not set up host forwarding rule"
#: seconds a KVM guest may stay silent before we decide it hangs in firmware
KVM_FIRST_OUTPUT = 15.0
#: how often the console log is read for the ready line during a boot (a stat and a read of
#: a small file: cheap), and how soon a failed first SSH attempt is retried
CONSOLE_POLL = 0.05
SSH_RETRY = 0.25


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


# --- run dirs ----------------------------------------------------------------------

_HELD: dict[Path, object] = {}   # run dir -> its open lock file, while this process holds it


def claim(run_dir: Path) -> bool:
    """Take ``run_dir``'s lock without waiting; True if this process holds it now (also
    when it already did).  Held until :func:`release` or the end of the process."""
    run_dir = Path(run_dir)
    if run_dir in _HELD:
        return True
    try:
        fh = open(run_dir / LOCK_FILE, "a")
    except OSError:
        return False
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return False
    _HELD[run_dir] = fh
    return True


def release(run_dir: Path) -> None:
    fh = _HELD.pop(Path(run_dir), None)
    if fh is not None:
        fh.close()


def new_run_dir(root: Path, label: str) -> Path:
    """A fresh run dir for one guest of ``label`` under ``root``, held by this process.
    Prunes the stale ones first (under ``root/.lock``, so never a dir being made)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        prune_run_dirs(root)
        path = root / f"{label}-{os.getpid()}-{secrets.token_hex(3)}"
        path.mkdir()
        claim(path)
    return path


def prune_run_dirs(root: Path, keep: int = 1) -> list[Path]:
    """Remove run dirs nobody holds and no QEMU runs from, but the newest ``keep`` of each
    label (their console logs stay readable).  Returns the removed dirs."""
    stale: dict[str, list[tuple[float, Path]]] = {}
    for entry in root.iterdir():
        match = RUN_DIR_NAME.match(entry.name)
        if not match or not entry.is_dir() or entry in _HELD or not claim(entry):
            continue
        if qemu_pids(entry):
            release(entry)          # an idle detached guest: kept, and free to claim
            continue
        stale.setdefault(match["label"], []).append((_mtime(entry), entry))
    removed = []
    for dirs in stale.values():
        dirs.sort(reverse=True)
        for index, (_, entry) in enumerate(dirs):
            if index >= keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            release(entry)
    return removed


def _mtime(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in (run_dir, run_dir / "console.log") if p.exists()]
    return max(times, default=0.0)


def qemu_pids(run_dir: Path) -> list[int]:
    """Live QEMU processes started for ``run_dir``."""
    return [pid for pid in runner.pids() if _pid_is_qemu(pid, run_dir)]


def plan(settings: Settings, kernel: Kernel, image: Image, run_dir: Path,
         accel: qemu.Accel | None = None, extra: tuple[qemu.Disk, ...] = ()) -> BootPlan:
    arch = qemu.ARCHES[settings.arch]
    run_dir.mkdir(parents=True, exist_ok=True)
    if not claim(run_dir):
        raise errors.RunDirBusy(path=run_dir)
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
        accel=accel, memory_mb=settings.memory_mb, cpus=settings.cpus, extra=tuple(extra))
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
        #: host ``time.monotonic()`` of the boot's milestones (``spawned``, ``kernel``: its first
        #: line on the console, ``ready``: ovl-init's ready line, ``ssh``: sshd answered) and
        #: ``ssh_tries``: connection attempts; read by the benchmark, never by a verdict
        self.timeline: dict[str, float] = {}

    # --- lifecycle -------------------------------------------------------
    @classmethod
    def boot(cls, plan: BootPlan, *, detach: bool = False) -> "Guest":
        runner.echo(f"  accelerator: {plan.spec.accel.name} ({plan.spec.accel.reason})")
        for attempt in range(1, PORT_TRIES + 1):
            guest = cls._start(plan, detach)
            try:
                guest._wait_ready()
                return guest
            except errors.KvmHang as exc:
                detail = _tail_file(plan.run_dir / "qemu.log")    # why it hung, before we stop it
                guest.stop()
                return cls.boot(_after_kvm_hang(plan, exc, detail), detach=detach)
            except errors.SSHPortTaken:
                guest.stop()
                if attempt == PORT_TRIES:
                    raise
                port = qemu.free_port()
                runner.echo(f"  QEMU could not bind SSH port {plan.spec.ssh_port} (another process took "
                            f"it meanwhile); retrying with port {port} ({attempt + 1}/{PORT_TRIES})")
                plan = replace(plan, spec=replace(plan.spec, ssh_port=port))
            except BaseException:
                guest.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

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
        guest.timeline["spawned"] = time.monotonic()
        if detach:
            guest.save_state()
        return guest

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_is_qemu(self.pid, self.plan.run_dir)

    def _check_port(self) -> None:
        """QEMU exited because the SSH port was taken: raise :class:`SSHPortTaken`."""
        if not self._alive() and BIND_FAILED in _tail_file(self.plan.run_dir / "qemu.log"):
            raise errors.SSHPortTaken(port=self.plan.spec.ssh_port,
                                      qemu_log=self.plan.run_dir / "qemu.log")

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

        def alive() -> bool:   # a KVM guest silent for KVM_FIRST_OUTPUT s counts as gone
            silent = kvm and not seen_output and time.monotonic() - start > KVM_FIRST_OUTPUT
            return self._alive() and not silent

        try:
            for line in console.follow(self.plan.spec.console_log, deadline=deadline, alive=alive,
                                      poll=CONSOLE_POLL):
                lines.append(line)
                seen_output = seen_output or bool(line.strip())
                event = console.classify(line)
                if event is console.Event.KERNEL_START:
                    self.timeline.setdefault("kernel", time.monotonic())
                if event is console.Event.READY:
                    self.timeline["ready"] = time.monotonic()
                    break
                if event in (console.Event.PANIC, console.Event.INIT_FAILED):
                    time.sleep(0.5)
                    self._fail(f"{event.value}: {line.strip()}", "read the console log; "
                               "check the kernel config and the root image")
                if kvm and not seen_output and time.monotonic() - start > KVM_FIRST_OUTPUT:
                    raise errors.KvmHang(seconds=KVM_FIRST_OUTPUT)
            else:
                self._check_port()
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

        self.conn.wait_until_up(remaining, abort=abort, interval=SSH_RETRY)
        self.timeline["ssh"] = time.monotonic()
        self.timeline["ssh_tries"] = float(self.conn.tries)
        self.boot_seconds = time.monotonic() - start
        record_timing("boot", self.boot_seconds)
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
        self.plan = fresh.plan      # the boot may have changed the port or the accelerator
        self.pid, self.proc, self.conn = fresh.pid, fresh.proc, fresh.conn
        self.boot_seconds, self.timeline = fresh.boot_seconds, fresh.timeline

    # --- who uses it ------------------------------------------------------
    def claim(self) -> bool:
        """Take the run dir's lock (see :func:`claim`): False if another harness process uses
        this guest."""
        return claim(self.plan.run_dir)

    def release(self) -> None:
        release(self.plan.run_dir)

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


def claim_idle(guests: list[Guest], kernel: Kernel, image: Image) -> Guest | None:
    """The first of ``guests`` (detached ones, see :func:`attach`) running ``kernel`` on
    ``image`` that no other harness process uses, now claimed by this one.  An idle guest
    of the same variant running another build is stopped on the way (it would only hold
    memory: nobody can reuse it)."""
    for found in guests:
        if found.plan.kernel_label != kernel.label or not found.claim():
            continue
        if found.plan.spec.kernel == kernel.bzimage and found.plan.spec.root.path == image.path:
            return found
        found.stop()
        found.release()
    return None


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
                     cmdline_extra=tuple(spec["cmdline_extra"]),
                     extra=tuple(disk(d) for d in spec.get("extra", ())))
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
    if not _pid_is_qemu(pid, run_dir, exec_wait=1.0):
        path.unlink(missing_ok=True)
        raise errors.GuestNotRunning(reason=f"QEMU pid {pid} from {path} has exited")
    return Guest(plan, pid, None, detached=True)


def _pid_is_qemu(pid: int, run_dir: Path, *, exec_wait: float = 0.0) -> bool:
    """True if ``pid`` is a live QEMU started for ``run_dir`` (not a recycled pid).
    ``exec_wait``: seconds to allow a process without a command line yet (just forked by
    another harness run, exec not done) to become one."""
    deadline = time.monotonic() + exec_wait
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        if not runner.pid_alive(pid):
            return False
        if cmdline or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return "qemu-system" in cmdline and f"{run_dir}/" in cmdline


def _after_kvm_hang(plan: BootPlan, exc: errors.KvmHang, qemu_log: str) -> BootPlan:
    """The same plan under TCG, after a KVM guest died or printed nothing (remembered
    until the host reboots, see :func:`qemu.remember_kvm_failure`)."""
    detail = str(exc) if qemu_log == "no output" else f"{exc}: {qemu_log}"
    runner.echo(f"  KVM guest died or printed nothing ({detail}); falling back to TCG "
                "(remembered until the host reboots)")
    if plan.accel_cache is not None:
        qemu.remember_kvm_failure(plan.spec.arch, plan.accel_cache, plan.probe_timeout, detail)
    tcg = qemu.Accel("tcg", "the KVM guest did not start the kernel; using TCG", qemu.TCG_FACTOR)
    return replace(plan, spec=replace(plan.spec, accel=tcg),
                   boot_timeout=plan.boot_timeout / plan.spec.accel.timeout_factor * tcg.timeout_factor)


def _tail_file(path: Path) -> str:
    return " | ".join(console.last_lines(path, 3)) or "no output"
