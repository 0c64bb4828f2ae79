"""A harness killed with SIGKILL while its guest boots leaves no QEMU behind, and the
next boot gets a run dir of its own; a guest command that hangs past its timeout is
gone from the guest afterwards.  One patched guest is booted (detached) and shared."""

from __future__ import annotations

import os
import time

import pytest

from tests.faults.conftest import (Harness, make_fault_cache, qemus_under, remove_fault_cache, settings_for,
                                   wait_until)
from vm import errors, pipeline
from vm.machine import guest as guest_mod

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.guest]

VARIANT = "patched"


@pytest.fixture(scope="module")
def boot_cache(tmp_path_factory):
    """Kernels, image, key and KVM verdict shared with the real cache; run/ of its own.
    At the end every guest booted in it is stopped (`invoke stop`) and none may be left."""
    cache = make_fault_cache(("sources", "ccache", "builds", "images", "ssh", "accel"))
    logs = tmp_path_factory.mktemp("boot-logs")
    yield cache, logs
    stop = Harness(["stop"], cache, logs / "stop.log")
    try:
        stop.check(120)
        assert qemus_under(cache) == [], "a QEMU of the fault cache outlived `invoke stop`"
    finally:
        stop.kill_group()
        remove_fault_cache(cache)


def _console_started(cache):
    for log in (cache / "run").glob(f"{VARIANT}-*/console.log"):
        if log.stat().st_size > 200:         # the kernel is printing: QEMU is well under way
            return log.parent
    return None


def test_a_boot_killed_midway_leaves_no_qemu(boot_cache, harnesses):
    cache, logs = boot_cache
    first = harnesses(["boot", "--variant", VARIANT], cache, logs / "killed.log")
    killed_dir = wait_until(lambda: _console_started(cache), 300, "the guest kernel to print", first)
    assert qemus_under(killed_dir), "QEMU should be running now"
    first.sigkill()
    # QEMU had PR_SET_PDEATHSIG: it is gone with the harness
    wait_until(lambda: not qemus_under(cache / "run"), 10, "the killed run's QEMU to exit")

    again = harnesses(["boot", "--variant", VARIANT, "--detach"], cache, logs / "rerun.log")
    out = again.check(600)
    assert "guest running" in out and "detached: pid" in out
    running = pipeline.find_guest(settings_for(cache), VARIANT)
    assert running.plan.run_dir != killed_dir and running.plan.run_dir.parent == killed_dir.parent
    assert qemus_under(killed_dir) == [] and qemus_under(running.plan.run_dir) == [running.pid]

    ssh = harnesses(["ssh", "--variant", VARIANT, "-c", "uname -r"], cache, logs / "ssh.log")
    assert running.plan.kernel_release in ssh.check(120)


@pytest.fixture(scope="module")
def detached_guest(boot_cache):
    """The detached guest of the test above, or one booted now."""
    cache, logs = boot_cache
    try:
        found = pipeline.find_guest(settings_for(cache), VARIANT)
    except errors.GuestNotRunning:
        boot = Harness(["boot", "--variant", VARIANT, "--detach"], cache, logs / "boot.log")
        try:
            boot.check(600)
        finally:
            boot.kill_group()
        found = pipeline.find_guest(settings_for(cache), VARIANT)
    assert found.claim(), "nobody else uses this guest"
    yield found
    found.conn.close()
    found.release()


def test_a_hung_guest_command_is_gone_after_its_timeout(detached_guest):
    g = detached_guest
    # unique durations, so that pgrep sees only these two sleeps
    first, second = (f"{os.getpid()}.{n}{time.monotonic_ns() % 100000}" for n in (1, 2))
    start = time.monotonic()
    with pytest.raises(errors.GuestCommandTimeout, match=r"within 3s .*killed in the guest"):
        g.run(["sh", "-c", f"sleep {first} & exec sleep {second}"], timeout=3)
    took = time.monotonic() - start
    left = g.run(["pgrep", "-af", f"sleep ({first}|{second})$"], timeout=60)
    assert left.exit_status == 1, f"still running in the guest: {left.stdout}"
    assert took < 30, f"the timeout and the kill took {took:.0f}s"
    assert g.run(["true"], timeout=60).ok, "the guest stays usable"
    assert guest_mod.qemu_pids(g.plan.run_dir) == [g.pid]
