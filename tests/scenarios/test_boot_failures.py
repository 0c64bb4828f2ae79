"""A guest that panics, hangs or refuses SSH fails fast, with a one-line cause, and no QEMU is left."""

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from vm import errors, pipeline
from vm.machine import guest as guest_mod
from vm.machine import qemu
from vm.machine.ssh import ensure_keypair

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def baseline_kernel(kernel_paths, settings):
    from tests.conftest import _load_kernel

    if pipeline.BASELINE in kernel_paths:
        return _load_kernel(kernel_paths[pipeline.BASELINE])
    return pipeline.build_kernel(settings, pipeline.Variant.parse(pipeline.BASELINE), pipeline.get_tree(settings))


def qemu_pids(run_dir):
    out = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_panic_fails_at_once_with_console_lines(baseline_kernel, guest_image, settings, tmp_path):
    # on TCG: this is about the panic, not the KVM fallback (tested below), whose
    # silence check would otherwise count against the deadline on a host where it hangs
    tcg = qemu.Accel("tcg", "the panic test boots on TCG", qemu.TCG_FACTOR)
    plan = guest_mod.plan(settings, baseline_kernel, guest_image, tmp_path / "run", accel=tcg)
    plan = replace(plan, spec=replace(plan.spec, cmdline_extra=("root=/dev/nonexistent",)))
    start = time.monotonic()
    with pytest.raises(errors.GuestBootFailed) as exc:
        guest_mod.Guest.boot(plan)
    msg = str(exc.value)
    assert "panic" in msg and "Unable to mount root fs" in msg
    assert "\n" not in msg
    assert time.monotonic() - start < plan.boot_timeout, "a panic must not wait for the deadline"
    assert qemu_pids(tmp_path / "run") == []


def test_hang_hits_the_deadline_and_stops_qemu(baseline_kernel, guest_image, settings, tmp_path):
    plan = guest_mod.plan(settings, baseline_kernel, guest_image, tmp_path / "run")
    # init that never starts sshd: the guest is alive but never ready
    plan = replace(plan, boot_timeout=8.0,
                   spec=replace(plan.spec, cmdline_extra=("init=/bin/sleep", "1000")))
    with pytest.raises(errors.GuestBootFailed, match="did not finish booting in 8s"):
        guest_mod.Guest.boot(plan)
    assert qemu_pids(tmp_path / "run") == []


def test_wrong_key_is_reported_as_ssh_auth_failure(baseline_kernel, guest_image, settings, tmp_path):
    plan = guest_mod.plan(settings, baseline_kernel, guest_image, tmp_path / "run")
    other_key, _ = ensure_keypair(tmp_path / "otherkey")
    plan = replace(plan, key_path=other_key)
    with pytest.raises(errors.SSHUnreachable, match="authorized_keys"):
        guest_mod.Guest.boot(plan)
    assert qemu_pids(tmp_path / "run") == []


def test_detached_guest_is_found_and_stopped(baseline_kernel, guest_image, settings, tmp_path):
    run_dir = tmp_path / "run"
    g = guest_mod.Guest.boot(guest_mod.plan(settings, baseline_kernel, guest_image, run_dir), detach=True)
    try:
        found = guest_mod.attach(run_dir)
        assert found.pid == g.pid and found.plan.kernel_release == baseline_kernel.release
        with found.conn as conn:
            assert conn.run(["uname", "-r"], check=True).stdout.strip() == baseline_kernel.release
        assert found.stop()
        assert qemu_pids(run_dir) == []
        with pytest.raises(errors.GuestNotRunning):
            guest_mod.attach(run_dir)
    finally:
        g.stop()


#: A qemu-system-x86_64 under which KVM "cannot start the kernel": asked for the kvm
#: accelerator, it starts the real QEMU paused (-S: a live process that never runs
#: guest code and prints nothing; on TCG, so it hangs the same way on every host,
#: with or without a working /dev/kvm); anything else runs the real QEMU unchanged.
#: Each start is logged to STARTS as "kvm" or "tcg".
HANGING_KVM = """#!{python}
import os, sys
real, starts, argv = {real!r}, {starts!r}, sys.argv[1:]
kvm = any(a == "-accel" and b == "kvm" for a, b in zip(argv, argv[1:]))
with open(starts, "a") as log:
    log.write("kvm\\n" if kvm else "tcg\\n")
if kvm:
    swap = {{"kvm": "tcg", "host": "max"}}
    argv = [swap.get(a, a) if p in ("-accel", "-cpu") else a for p, a in zip([""] + argv, argv)] + ["-S"]
os.execv(real, [real] + argv)
"""


def hanging_kvm_qemu(tmp_path):
    """The wrapper above as an executable in ``tmp_path``, and the file it logs its starts to."""
    wrapper, starts = tmp_path / "qemu-system-x86_64", tmp_path / "qemu-starts"
    real = shutil.which(qemu.X86_64.binary)
    assert real, f"{qemu.X86_64.binary} is not installed (apt-get install qemu-system-x86)"
    wrapper.write_text(HANGING_KVM.format(python=sys.executable, real=real, starts=str(starts)))
    wrapper.chmod(0o755)
    return wrapper, starts


def test_kvm_that_cannot_start_the_kernel_falls_back_to_tcg(baseline_kernel, guest_image, settings, tmp_path):
    """KVM passes the probe (the accelerator is chosen for the test) but the guest
    hangs before the kernel prints: the boot gives up on KVM, remembers that, and
    comes up under TCG."""
    wrapper, starts = hanging_kvm_qemu(tmp_path)
    forced = qemu.Accel("kvm", "KVM probe passed (chosen by the test)", qemu.KVM_FACTOR)
    plan = guest_mod.plan(settings, baseline_kernel, guest_image, tmp_path / "run", accel=forced)
    arch = replace(plan.spec.arch, binary=str(wrapper))
    plan = replace(plan, accel_cache=tmp_path / "accel",   # the real verdict cache stays out of it
                   spec=replace(plan.spec, arch=arch))
    start = time.time()
    with guest_mod.Guest.boot(plan) as g:
        assert g.run(["true"]).ok
        used = g.plan.spec.accel
    assert starts.read_text().split() == ["kvm", "tcg"], "one hanging KVM start, then TCG"
    assert used.name == "tcg" and "the KVM guest did not start the kernel" in used.reason, used
    verdict = tmp_path / "accel" / qemu.VERDICT_FILE
    remembered = json.loads(verdict.read_text())
    assert remembered["ok"] is False and "a kernel booted under KVM hung" in remembered["detail"], remembered
    assert remembered["stamp"]["qemu"] == str(wrapper.resolve())
    if qemu.kvm_usable() is None:   # the next boot of this host boot goes straight to TCG
        again = qemu.choose_accel(arch, "auto", tmp_path / "accel", plan.probe_timeout)
        assert again.name == "tcg" and "hung" in again.reason, again
    assert qemu_pids(tmp_path / "run") == []
    given_up_after = verdict.stat().st_mtime - start
    assert given_up_after < guest_mod.KVM_FIRST_OUTPUT + 10, (
        f"the silent KVM guest was given up after {given_up_after:.0f}s, not after "
        f"{guest_mod.KVM_FIRST_OUTPUT:.0f}s of silence (vm/machine/guest.py Guest._wait_ready)")
