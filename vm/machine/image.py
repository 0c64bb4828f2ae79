"""The guest's root filesystem: Debian packages + a tiny init, as an ext4 image.

Built with mmdebstrap from the host's own apt sources (no mirror is named
here), post-processed on the host, and packed with ``mke2fs -d`` so no loop
mount and no root-owned mount point are needed.  The result is cached under a
key of everything that goes into it; ``SOURCE_DATE_EPOCH`` and fixed
filesystem UUIDs keep rebuilds reproducible.

``images/<key>.lock`` (flock) is held around "reuse or build", so a second
harness run waits for the first and reuses its image.  The image is built in
``images/.tmp-<key>-*`` and renamed to ``images/<key>/`` when complete;
mmdebstrap runs in its own mount and pid namespaces and dies with the
harness, so a killed build leaves no process and no mount behind, only a temp
dir that the next build of that key removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from vm import errors, runner
from vm.kernel.build import die_with_harness, exclusive, remove_leftovers

GUESTFS = Path(__file__).parent / "guestfs"

DEFAULT_PACKAGES = (
    "openssh-server", "dmsetup", "e2fsprogs", "xfsprogs", "attr", "kmod", "util-linux",
    "mount", "coreutils", "iproute2", "procps",
)

SSHD_CONFIG = """\
# ovl-volatile-harness: key-only root login for the test harness.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
"""

APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


@dataclass(frozen=True)
class ImageSpec:
    suite: str
    packages: tuple[str, ...]
    sources: Path
    epoch: int = 1700000000

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.suite}\0{','.join(sorted(self.packages))}\0{self.epoch}\0".encode())
        h.update(self.sources.read_bytes())
        for f in sorted(GUESTFS.iterdir()):
            h.update(f.name.encode() + f.read_bytes())
        h.update(SSHD_CONFIG.encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    path: Path
    key: str


def host_sources() -> Path:
    for path in APT_SOURCES:
        if path.is_file() and path.stat().st_size:
            return path
    raise errors.ImageBuildFailed(reason="the host has no apt sources to build the guest from",
                                  fix="configure /etc/apt/sources.list.d/debian.sources")


def host_suite() -> str:
    """The host's Debian codename, so the guest matches what apt can reach."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip('"') or "bookworm"
    except OSError:
        pass
    return "bookworm"


def compile_syscall_helper(dest: Path) -> None:
    runner.run(["gcc", "-static", "-O2", "-Wall", "-o", dest, GUESTFS / "ovl-syscall.c"],
               fix="install build-essential (invoke setup)")


def customize(root: Path) -> None:
    """Host-side changes to the unpacked rootfs."""
    shutil.copy2(GUESTFS / "ovl-init", root / "sbin" / "ovl-init")
    os.chmod(root / "sbin" / "ovl-init", 0o755)
    compile_syscall_helper(root / "usr" / "local" / "bin" / "ovl-syscall")
    (root / "etc" / "ssh" / "sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "ssh" / "sshd_config.d" / "ovl-harness.conf").write_text(SSHD_CONFIG)
    for old in (root / "etc" / "ssh").glob("ssh_host_*"):
        old.unlink()
    runner.run(["ssh-keygen", "-A", "-f", root], quiet=True)
    (root / "etc" / "hostname").write_text("ovl-guest\n")
    (root / "etc" / "fstab").write_text("# root and modules are mounted by /sbin/ovl-init\n")
    (root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
    (root / "root").chmod(0o700)


def build_image(spec: ImageSpec, images_root: Path) -> Image:
    """Build (or reuse) the image for ``spec``; one build per key at a time."""
    key = spec.key()
    image = images_root / key / "rootfs.ext4"
    if image.is_file():
        runner.echo(f"  guest image: up to date ({image})")
        return Image(image, key)
    runner.require("mmdebstrap", "mmdebstrap")
    runner.require("mke2fs", "e2fsprogs")
    with exclusive(images_root / f"{key}.lock",
                   f"guest image: another harness run is building {images_root / key}; waiting for it"):
        if image.is_file():
            runner.echo(f"  guest image: built by the other run ({image}, reused)")
            return Image(image, key)
        for stale in images_root.glob(f".tmp-{key}-*"):
            remove_leftovers(stale, "the unfinished guest image build")
        if (images_root / key).exists():      # a final dir without its image: never trusted
            remove_leftovers(images_root / key, "the incomplete guest image")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=images_root))
        try:
            _make_image(spec, key, tmp)
            os.rename(tmp, images_root / key)
        except BaseException:
            remove_leftovers(tmp, "the failed guest image build")
            raise
    return Image(image, key)


def mmdebstrap_argv(spec: ImageSpec, root: Path) -> list[str]:
    """mmdebstrap in new mount and pid namespaces (``unshare --kill-child``), under
    ``--pdeathsig``: if the harness dies, the namespace's init dies, the kernel kills
    everything in it (apt, dpkg) and the chroot's /proc, /sys and /dev mounts go with it."""
    return die_with_harness([
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
        "mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
        f"--include={','.join(spec.packages)}",
        "--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*",
        spec.suite, root, spec.sources])


def _make_image(spec: ImageSpec, key: str, tmp: Path) -> None:
    root = tmp / "root"
    env = {"SOURCE_DATE_EPOCH": str(spec.epoch)}
    with runner.phase(f"guest image: mmdebstrap {spec.suite} ({len(spec.packages)} packages)"):
        runner.run(mmdebstrap_argv(spec, root), env=env, capture=False,
                   fix="check the host's apt sources and network access to its mirror")
    with runner.phase("guest image: customize + mke2fs"):
        customize(root)
        size_mb = int(_du_mb(root) * 1.4) + 256
        fs_uuid = str(uuid.UUID(hex=hashlib.sha256(key.encode()).hexdigest()[:32]))
        runner.run(die_with_harness(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "ovlroot", "-U", fs_uuid,
                                     "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-d", root,
                                     tmp / "rootfs.ext4", f"{size_mb}M"]),
                   env={"E2FSPROGS_FAKE_TIME": str(spec.epoch)})
    shutil.rmtree(root)


def _du_mb(root: Path) -> float:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total / (1024 * 1024)
