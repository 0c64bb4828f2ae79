"""A harness killed with SIGKILL in the middle of a kernel build or a guest image build
leaves nothing that a rerun trusts, and no process working on: the rerun removes the
unfinished dir and builds again; two reruns started together build once (one waits for
the other's lock, then reuses its result)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.faults.conftest import leftovers, make_fault_cache, remove_fault_cache, wait_until
from vm.kernel import build
from vm.kernel.build import users_of

pytestmark = [pytest.mark.faults, pytest.mark.slow]

COMPILING = re.compile(r"^\s+CC\s", re.M)


@pytest.fixture
def build_cache():
    """Sources, ccache, images and the SSH key shared with the real cache; no builds."""
    cache = make_fault_cache(("sources", "ccache", "images", "ssh", "accel"))
    (cache / "builds").mkdir()
    yield cache
    remove_fault_cache(cache)


def _build_dir(cache):
    dirs = [d for d in (cache / "builds").iterdir() if d.is_dir() and not d.name.startswith(".")]
    return dirs[0] if len(dirs) == 1 else None


def test_a_kernel_build_killed_while_compiling(build_cache, harnesses, tmp_path):
    first = harnesses(["build", "--variants", "baseline"], build_cache, tmp_path / "killed.log")
    build_dir = wait_until(lambda: _build_dir(build_cache), 120, "the build dir", first)
    log = build_dir / "build.log"
    wait_until(lambda: log.is_file() and COMPILING.search(log.read_text(errors="replace")), 180,
               "compilation to start (CC lines in build.log)", first)
    first.sigkill()

    # make had PR_SET_PDEATHSIG: it died with the harness; what it ran ends within seconds
    assert leftovers(build_dir) == [], "processes still work in the killed build"
    assert build.existing(build_dir) is None and not (build_dir / "out" / "build.json").exists()

    # two reruns at once: one removes the unfinished dir and builds, the other waits and reuses
    again = [harnesses(["build", "--variants", "baseline"], build_cache, tmp_path / f"rerun{n}.log")
             for n in (1, 2)]
    outputs = [h.check(1500) for h in again]
    builder = [o for o in outputs if "removing the unfinished build" in o]
    waiter = [o for o in outputs if "waiting for it" in o and "built by the other run" in o]
    assert len(builder) == 1 and len(waiter) == 1, "\n=====\n".join(o[-2500:] for o in outputs)
    assert "bzImage + modules" not in waiter[0], "the waiting run must not compile"

    kernel = build.existing(build_dir)
    assert kernel is not None and kernel.bzimage.stat().st_size > 1_000_000
    assert kernel.modules_img.is_file() and (build_dir / "out" / "config").is_file()
    assert not list((build_cache / "builds").glob(".trash-*")), "the removed dir must be gone"


@pytest.fixture
def image_cache():
    """Nothing shared: the image build needs only the host's apt sources."""
    cache = make_fault_cache(())
    yield cache
    remove_fault_cache(cache)


def _chroot_mounted(cache):
    """The temp dir of the image build once mmdebstrap has mounted /proc in its chroot
    (seen in the mount table of mmdebstrap's own namespace, not the host's)."""
    for tmp in (cache / "images").glob(".tmp-*"):
        for pid in users_of(tmp):
            try:
                if f" {tmp}/root/proc " in Path(f"/proc/{pid}/mountinfo").read_text():
                    return tmp
            except OSError:
                pass
    return None


def test_an_image_build_killed_in_mmdebstrap(image_cache, harnesses, tmp_path):
    first = harnesses(["image"], image_cache, tmp_path / "killed.log")
    tmp = wait_until(lambda: _chroot_mounted(image_cache), 300, "mmdebstrap to mount /proc in its chroot", first)
    first.sigkill()

    # mmdebstrap ran in its own pid and mount namespaces under --pdeathsig: all of it is gone,
    # and so are the chroot's /proc, /sys and /dev mounts
    assert leftovers(tmp) == [], "processes still work in the killed image build"
    assert build.mounts_under(image_cache / "images") == []
    assert not list((image_cache / "images").glob("*/rootfs.ext4"))

    again = [harnesses(["image"], image_cache, tmp_path / f"rerun{n}.log") for n in (1, 2)]
    outputs = [h.check(900) for h in again]
    builder = [o for o in outputs if "removing the unfinished guest image build" in o]
    waiter = [o for o in outputs if "waiting for it" in o and "built by the other run" in o]
    assert len(builder) == 1 and len(waiter) == 1, "\n=====\n".join(o[-2500:] for o in outputs)

    images = list((image_cache / "images").glob("*/rootfs.ext4"))
    assert len(images) == 1 and images[0].stat().st_size > 50_000_000
    assert all(o.strip().endswith(str(images[0])) for o in outputs)
    assert not list((image_cache / "images").glob(".tmp-*")) and not list((image_cache / "images").glob(".trash-*"))
