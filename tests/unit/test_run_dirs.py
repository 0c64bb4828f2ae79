"""Guests of concurrent harness runs: a run dir each, held by a lock; stale ones pruned;
detached guests found and claimed; an SSH port taken before QEMU binds it is retried.

Real processes throughout: other lock holders are other Python processes, the
"guests" are real QEMUs running the accelerator probe's multiboot kernel (it
prints OK and halts, so a boot never becomes ready and no Linux is needed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vm import errors, pipeline
from vm.machine import guest, qemu
from vm.settings import Settings

pytestmark = pytest.mark.unit

HOLD = ("import fcntl, sys, time\n"
        "fh = open(sys.argv[1], 'a')\n"
        "try:\n    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n    sys.exit(1)\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n")


def other_process_can_claim(run_dir: Path) -> bool:
    return subprocess.run([sys.executable, "-c", HOLD, str(run_dir / guest.LOCK_FILE), "0"],
                          capture_output=True).returncode == 0


def test_a_new_run_dir_is_fresh_and_held(tmp_path):
    root = tmp_path / "run"
    first, second = guest.new_run_dir(root, "patched"), guest.new_run_dir(root, "patched")
    try:
        assert first != second and first.parent == second.parent == root
        match = guest.RUN_DIR_NAME.match(first.name)
        assert match and match["label"] == "patched" and int(match["pid"]) == os.getpid()
        assert guest.RUN_DIR_NAME.match("prefix-3-123-abcdef")["label"] == "prefix-3"
        assert not other_process_can_claim(first), "another harness process must not get this run dir"
        guest.release(first)
        assert other_process_can_claim(first)
    finally:
        guest.release(first)
        guest.release(second)


def _qemu_for(run_dir: Path) -> subprocess.Popen:
    """A paused QEMU whose command line names ``run_dir`` (as a guest's console log does)."""
    return subprocess.Popen(["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S",
                             "-chardev", f"file,id=con,path={run_dir}/console.log", "-serial", "chardev:con"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_prune_keeps_held_running_and_newest_dirs(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    made = {}
    for n, name in enumerate(["patched-1-aaaaaa", "patched-2-bbbbbb", "patched-3-cccccc", "baseline-4-dddddd",
                              "patched-5-eeeeee", "patched-6-ffffff", "patched"]):
        made[name] = root / name
        made[name].mkdir()
        (made[name] / guest.LOCK_FILE).touch()           # new_run_dir makes it with the dir
        stamp = time.time() - 1000 + n
        os.utime(made[name], (stamp, stamp))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(made["patched-5-eeeeee"] / guest.LOCK_FILE), "60"],
                              stdout=subprocess.PIPE, text=True)
    vm = _qemu_for(made["patched-6-ffffff"])
    try:
        assert holder.stdout.readline().strip() == "held"
        deadline = time.monotonic() + 10
        while not guest.qemu_pids(made["patched-6-ffffff"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        removed = guest.prune_run_dirs(root)
        assert sorted(p.name for p in removed) == ["patched-1-aaaaaa", "patched-2-bbbbbb"]
        left = sorted(p.name for p in root.iterdir())
        # newest stale patched (3) and baseline (4) kept for their logs; 5 is held; 6 runs a QEMU;
        # "patched" is not a run dir this harness made (the old layout): never touched
        assert left == ["baseline-4-dddddd", "patched", "patched-3-cccccc", "patched-5-eeeeee", "patched-6-ffffff"]
        assert other_process_can_claim(made["patched-6-ffffff"]), "pruning must not keep what it checked"
    finally:
        holder.kill()
        vm.kill()
        holder.wait()
        vm.wait()


# --- real QEMUs through Guest.boot ---------------------------------------------------------

def probe_plan(tmp_path: Path, run_dir: Path, port: int, boot_timeout: float = 2.0) -> guest.BootPlan:
    run_dir.mkdir(parents=True, exist_ok=True)
    disk = tmp_path / "empty.img"
    disk.write_bytes(b"\0" * 65536)
    spec = qemu.VMSpec(arch=qemu.X86_64, kernel=qemu.probe_image(tmp_path / "probe.bin"),
                       root=qemu.Disk(disk, "ovlroot", snapshot=True),
                       modules=qemu.Disk(disk, "ovlmodules", snapshot=True), scratch=(),
                       console_log=run_dir / "console.log", ssh_port=port, pubkey_b64="eA==",
                       accel=qemu.Accel("tcg", "test", qemu.TCG_FACTOR), memory_mb=64, cpus=1)
    return guest.BootPlan(spec, run_dir, tmp_path / "key", "patched", "6.12.0-test", boot_timeout)


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_ssh_port_is_retried_with_another(tmp_path, taken_port, capsys):
    plan = probe_plan(tmp_path, tmp_path / "run", taken_port)
    with pytest.raises(errors.GuestBootFailed, match="did not finish booting in 2s"):
        guest.Guest.boot(plan)          # the probe kernel never starts sshd: the deadline ends it
    err = capsys.readouterr().err
    assert f"QEMU could not bind SSH port {taken_port}" in err and "retrying with port" in err
    assert guest.qemu_pids(plan.run_dir) == []


def test_a_port_that_stays_taken_fails_after_a_few_tries(tmp_path, taken_port, monkeypatch, capsys):
    monkeypatch.setattr(qemu, "free_port", lambda: taken_port)
    plan = probe_plan(tmp_path, tmp_path / "run", taken_port)
    start = time.monotonic()
    with pytest.raises(errors.SSHPortTaken) as info:
        guest.Guest.boot(plan)
    assert f"127.0.0.1:{taken_port}" in str(info.value) and "\n" not in str(info.value)
    assert capsys.readouterr().err.count("retrying with port") == guest.PORT_TRIES - 1
    assert time.monotonic() - start < 30, "QEMU exits at once: no boot deadline is waited for"
    assert guest.qemu_pids(plan.run_dir) == []


def test_detached_guests_are_found_claimed_and_stopped(tmp_path):
    settings = Settings.from_mapping({"cache_dir": str(tmp_path / "cache")})
    run_dir = pipeline.run_dir(settings, "patched")
    plan = probe_plan(tmp_path, run_dir, qemu.free_port())
    g = guest.Guest._start(plan, detach=True)          # a detached QEMU with its guest.json
    try:
        guest.release(run_dir)                          # as when `invoke boot --detach` exits
        found = pipeline.find_guest(settings, "patched")
        assert found.pid == g.pid and found.plan.run_dir == run_dir
        assert pipeline.find_guest(settings, None).pid == g.pid
        with pytest.raises(errors.GuestNotRunning, match="no detached baseline guest"):
            pipeline.find_guest(settings, "baseline")
        assert found.claim() and not other_process_can_claim(run_dir)
        kernel = type("K", (), {"label": "patched", "bzimage": plan.spec.kernel})()
        image = type("I", (), {"path": plan.spec.root.path})()
        # claimed by this process; claim() is re-entrant here, another process would not get it
        assert guest.claim_idle(pipeline.running_guests(settings), kernel, image).pid == g.pid
        found.release()
        # a new run dir prunes stale ones, never the one a detached QEMU runs from
        other = pipeline.run_dir(settings, "patched")
        assert run_dir.is_dir()
        guest.release(other)
        assert found.stop() and guest.qemu_pids(run_dir) == []
        assert pipeline.running_guests(settings) == []
    finally:
        g.stop()
        guest.release(run_dir)


def test_a_boot_into_a_run_dir_held_elsewhere_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir / guest.LOCK_FILE), "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        settings = Settings.from_mapping({"cache_dir": str(tmp_path / "cache")})
        plan = probe_plan(tmp_path, tmp_path / "x", 1)
        kernel = type("K", (), {"bzimage": plan.spec.kernel, "modules_img": plan.spec.root.path,
                                "label": "patched", "release": "x"})()
        image = type("I", (), {"path": plan.spec.root.path})()
        with pytest.raises(errors.RunDirBusy, match="in use by another harness process"):
            guest.plan(settings, kernel, image, run_dir, accel=plan.spec.accel)
    finally:
        holder.kill()
        holder.wait()


def test_process_scans_survive_a_process_exiting_mid_scan(tmp_path, monkeypatch):
    """A process that exits while /proc is scanned must not fail the scan: a stat of its
    /proc/<pid>/cmdline then raises ProcessLookupError (a bisect step in CI failed its
    setup on exactly that). The scans read /proc's listing and each file, never stat."""
    from pathlib import Path as P

    from vm import runner
    from vm.kernel import build

    real_stat = P.stat

    def exiting(self, *args, **kwargs):
        if self.parent.parent == P("/proc") and self.parent.name.isdigit():
            raise ProcessLookupError(3, "No such process", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(P, "stat", exiting)
    assert guest.qemu_pids(tmp_path) == []
    assert build.users_of(tmp_path) == []
    assert runner.group_alive(os.getpgrp())
