"""Incremental kernel builds in a kept ``O=`` dir, and what they produced.

``invoke bisect`` (one kept ``O=`` dir for every step), ``invoke test --source
tree:`` on a series branch and ``invoke retest`` (a kept ``O=`` dir for the
baseline and one for the work tree) build through :func:`build_in_place`:
kbuild recompiles only what changed since the last build in that dir, so
touching one file of ``fs/overlayfs`` recompiles that file and relinks
``overlay.ko``.

:func:`artifacts` fingerprints a finished build so a caller can tell what an
incremental build changed: the code the kernel boots with (built in) or only
the overlayfs module (``kconfig/base.config`` builds overlay as ``=m``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vm import runner
from vm.kernel import build, kconfig

#: the overlayfs module, relative to the O= dir
OVERLAY_KO = Path("fs/overlayfs/overlay.ko")
#: every built-in object linked into the kernel, relative to the O= dir (see :func:`artifacts`)
VMLINUX_O = Path("vmlinux.o")
BZIMAGE = Path("arch/x86/boot/bzImage")
#: in the O= dir: the fingerprint of the fragments its .config was made from (see build_in_place)
FRAGMENTS_STAMP = ".ovl-fragments"


@dataclass(frozen=True)
class Artifacts:
    """sha256 digests of what a build made ("" when the file is missing)."""

    builtin: str      # the built-in code: vmlinux.o (see artifacts())
    overlay: str      # fs/overlayfs/overlay.ko
    bzimage: str = ""  # informational: what QEMU boots

    def to_dict(self) -> dict:
        return {"builtin": self.builtin, "overlay": self.overlay, "bzimage": self.bzimage}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Artifacts | None":
        if not data or "builtin" not in data or "overlay" not in data:
            return None
        return cls(str(data["builtin"]), str(data["overlay"]), str(data.get("bzimage", "")))


def digest(path: Path) -> str:
    if not path.is_file():
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifacts(obj: Path) -> Artifacts:
    """What the build in ``obj`` made.

    The built-in side is ``vmlinux.o``, the link of every built-in object, not
    ``vmlinux`` or ``bzImage``: whenever kbuild runs its vmlinux rule it links
    a fresh ``init/version-timestamp.o`` (build number from ``.version``, build
    time), so ``vmlinux`` and ``bzImage`` can differ although no built-in code
    did; ``vmlinux.o`` only changes when a built-in object does.  Measured on
    7.2 (README, "The developer loop"): after a line added to
    ``fs/overlayfs/util.c`` kbuild rebuilt util.o, overlay.o and overlay.ko
    only, and ``vmlinux.o``, ``vmlinux`` and ``bzImage`` stayed byte-identical;
    after one added to ``fs/super.c`` all three changed (version-timestamp.o
    rebuilt, ``.tmp_vmlinux1/2`` relinked).
    """
    return Artifacts(builtin=digest(obj / VMLINUX_O), overlay=digest(obj / OVERLAY_KO),
                     bzimage=digest(obj / BZIMAGE))


def build_in_place(src: Path, obj: Path, kdir: Path, *, label: str, version: str, key: str,
                   fragments: Sequence[kconfig.Fragment], tc: build.Toolchain, log: Path,
                   series: Sequence[str] = (), series_hash: str = "none") -> build.Kernel:
    """Build ``src`` incrementally in the kept ``obj`` and package it into ``kdir/out``
    (bzImage, modules image, config, ``build.json`` last).  When the build changed none
    of :func:`artifacts` and ``kdir`` holds a finished package, that package is kept.
    The ``.config`` is made again only when the fragments changed (or the last
    configure did not finish): kbuild re-syncs it itself when a Kconfig file changed."""
    start = time.monotonic()
    obj.mkdir(parents=True, exist_ok=True)
    before = artifacts(obj)
    stamp = obj / FRAGMENTS_STAMP
    made_from = kconfig.fingerprint(fragments) if fragments else ""
    same = bool(made_from) and stamp.is_file() and stamp.read_text() == made_from
    stamp.unlink(missing_ok=True)
    config, release = build.compile_tree(src, obj, fragments, tc, log, label, reconfigure=not same)
    if made_from:
        stamp.write_text(made_from)
    done = build.existing(kdir)
    if done is not None and done.release == release and before.builtin and artifacts(obj) == before:
        runner.echo(f"  {label}: nothing changed in O={obj} ({time.monotonic() - start:.0f}s); "
                    f"kept {done.bzimage}")
        return done
    kdir.mkdir(parents=True, exist_ok=True)
    out = kdir / "out"
    build.package(src, obj, config, release, tc, log, out, label)
    kernel = build.Kernel(label=label, version=version or release, key=key, build_dir=kdir, bzimage=out / "bzImage",
                          modules_img=out / "modules.ext4", config=out / "config", release=release,
                          series=list(series), series_hash=series_hash,
                          config_hash=kconfig.fingerprint(fragments),
                          seconds=round(time.monotonic() - start, 1))
    build.write_stamp(kernel)
    runner.echo(f"  {label}: built {release} in {kernel.seconds:.0f}s (incremental, O={obj})")
    return kernel
