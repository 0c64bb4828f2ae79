"""A guest that panics, hangs or refuses SSH fails fast, with a one-line cause, and no QEMU is left."""

import subprocess
import time
from dataclasses import replace

import pytest

from vm import errors, pipeline
from vm.machine import guest as guest_mod
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
    plan = guest_mod.plan(settings, baseline_kernel, guest_image, tmp_path / "run")
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


def test_kvm_that_cannot_start_the_kernel_falls_back_to_tcg(baseline_kernel, guest_image, settings, tmp_path):
    """Force KVM past the probe: where KVM works the guest runs under it; where the
    KVM guest dies or hangs before the kernel prints (this project's CI host), the
    boot notices within seconds and comes up under TCG instead."""
    from vm.machine import qemu

    probe_ok, _ = qemu.run_probe(qemu.probe_argv(qemu.X86_64, "kvm", qemu.probe_image(tmp_path / "p.bin")), 10)
    forced = qemu.Accel("kvm", "forced by the test", qemu.KVM_FACTOR)
    plan = guest_mod.plan(settings, baseline_kernel, guest_image, tmp_path / "run", accel=forced)
    plan = replace(plan, accel_cache=tmp_path / "accel")   # keep the real verdict cache out of it
    start = time.monotonic()
    with guest_mod.Guest.boot(plan) as g:
        assert g.run(["true"]).ok
        used = g.plan.spec.accel
    if not probe_ok:
        assert used.name == "tcg" and "KVM" in used.reason
        assert time.monotonic() - start < guest_mod.KVM_FIRST_OUTPUT + 60
    if used.name == "tcg":
        # remembered: the next boot of this host boot goes straight to TCG
        again = qemu.choose_accel(qemu.X86_64, "auto", tmp_path / "accel", plan.probe_timeout)
        assert again.name == "tcg" and "hung" in again.reason
    assert qemu_pids(tmp_path / "run") == []
