"""Review finding 2: the overlay boot id is made from a seeded RNG, even with overlayfs built in.

Boots the boot-id kernel (``kconfig/boot-rng.config`` on top of the patched
kernel: overlayfs built in, boot-time kprobe events) with untrusted CPU and
boot-loader entropy, makes one volatile mount (that makes the boot id) and
judges the probe events (:mod:`vm.suites.bootrng`): overlayfs initialised
before the crng was ready (the positive control), and the boot id was made
only once it was ready.  The series before the fix made it in ``ovl_init()``
and fails here (README, "Review findings").
"""

from dataclasses import replace

import pytest

from vm import errors, pipeline
from vm.machine import console
from vm.machine import guest as guest_mod
from vm.suites import bootrng

pytestmark = pytest.mark.guest

SETUP = ("set -e; mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; "
         "mkdir -p /mnt/rng; mount -t tmpfs rng /mnt/rng; cd /mnt/rng; mkdir lower upper work merged; "
         "mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work,volatile merged; "
         "touch merged/file; umount merged")


@pytest.fixture(scope="module")
def rng_kernel(kernel_paths, settings):
    from tests.conftest import _load_kernel

    if pipeline.PATCHED in kernel_paths:
        kernel = _load_kernel(kernel_paths[pipeline.PATCHED])
    else:
        s = pipeline.boot_rng_settings(settings)
        kernel = pipeline.build_kernel(s, pipeline.Variant.parse(pipeline.PATCHED), pipeline.get_tree(s))
    config = kernel.config.read_text().splitlines()
    missing = [opt for opt in bootrng.REQUIRED if opt not in config]
    if missing:
        raise errors.BadArgument(what=f"{kernel.build_dir} is not a boot-id kernel (lacks {', '.join(missing)})",
                                 fix=f"build it with kconfig/{settings.boot_rng_fragment}.config "
                                     "(`invoke ci --shard boot-id`, or omit --kernel)")
    return kernel


@pytest.fixture(scope="module")
def rng_guest(rng_kernel, guest_image, settings, results_dir, tmp_path_factory):
    plan = guest_mod.plan(settings, rng_kernel, guest_image, tmp_path_factory.mktemp("boot-id") / "run")
    plan = replace(plan, spec=replace(plan.spec, cmdline_extra=bootrng.CMDLINE))
    g = guest_mod.Guest.boot(plan)
    try:
        yield g
    finally:
        g.stop()
        g.release()
        (results_dir / f"console-boot-id-{rng_kernel.label}.log").write_bytes(plan.spec.console_log.read_bytes())


def test_boot_id_is_made_from_a_seeded_rng(rng_guest, rng_kernel, results_dir, record_property):
    record_property("kernel_release", rng_kernel.release)
    record_property("accelerator", rng_guest.plan.spec.accel.name)
    rng_guest.run(["sh", "-c", SETUP], check=True)
    trace = rng_guest.run(["cat", bootrng.TRACE], check=True).stdout
    (results_dir / f"boot-id-trace-{rng_kernel.label}.txt").write_text(trace)
    dmesg = rng_guest.run(["dmesg"], check=True).stdout
    (results_dir / f"boot-id-dmesg-{rng_kernel.label}.txt").write_text(dmesg)
    hits = bootrng.parse_trace(trace)
    print("\n".join(str(h) for h in hits))
    found = bootrng.problems(hits)
    assert not found, "; ".join(found)
    lines = rng_guest.plan.spec.console_log.read_text(errors="replace").splitlines()
    assert not console.find_splats(lines), "kernel reported a splat during boot or the mount"
