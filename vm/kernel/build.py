"""Out-of-tree kernel builds keyed by what went into them.

A build lives in ``<cache>/builds/<label>-<version>-<key>/``:

- ``src/``  hard-linked copy of the pristine tree with the series applied,
- ``obj/``  the ``O=`` directory,
- ``out/``  the artifacts: ``bzImage``, ``modules.ext4``, ``config``, ``build.json``.

``key`` hashes the tree, the series and the config fragments, so unchanged
inputs never rebuild, and baseline and patched kernels never share a dir.

Two harness runs may build at once: ``builds/<dirname>.lock`` (flock) is held
around "reuse or build", so a second build of the same key waits for the first
and then reuses its result.  ``out/build.json`` is written last; a dir without
it is a killed or failed build, which the next build (holding the lock) stops
the leftover processes of and removes before starting again.  Long-running
children (make) get ``PR_SET_PDEATHSIG``, so they die with the harness.
``src`` and ``obj`` sit side by side in every build, so with ccache's
``base_dir`` the compiler command lines are identical across builds and a
series prefix that only touches overlayfs recompiles only overlayfs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from vm import errors, runner
from vm.kernel import kconfig
from vm.kernel.patch import Series, prepare_source

#: bump when the recipe below changes in a way that changes the output
RECIPE_VERSION = "1"

ERROR_LINE = re.compile(
    r"(\berror\b|\*\*\*|undefined reference|Error \d+|No rule to make target|fatal:)", re.I)


@dataclass(frozen=True)
class BuildInputs:
    label: str                 # "baseline", "patched", "prefix-2", ...
    tree_path: Path            # pristine tree
    tree_key: str
    version: str
    series: Series | None      # None or empty for the baseline
    fragments: tuple[kconfig.Fragment, ...]

    def key(self) -> str:
        import hashlib
        h = hashlib.sha256()
        series = self.series.fingerprint() if self.series and len(self.series) else "none"
        for part in (RECIPE_VERSION, self.tree_key, series, kconfig.fingerprint(self.fragments)):
            h.update(part.encode() + b"\0")
        return h.hexdigest()[:12]

    def dirname(self) -> str:
        return f"{self.label}-{self.version}-{self.key()}"


@dataclass
class Kernel:
    """A finished build, as recorded in ``out/build.json``."""

    label: str
    version: str
    key: str
    build_dir: Path
    bzimage: Path
    modules_img: Path
    config: Path
    release: str
    series: list[str] = field(default_factory=list)
    series_hash: str = "none"
    config_hash: str = ""
    seconds: float = 0.0

    def to_json(self) -> str:
        data = asdict(self)
        for k in ("build_dir", "bzimage", "modules_img", "config"):
            data[k] = str(data[k])
        return json.dumps(data, indent=2)

    @classmethod
    def load(cls, stamp: Path) -> "Kernel":
        data = json.loads(stamp.read_text())
        for k in ("build_dir", "bzimage", "modules_img", "config"):
            data[k] = Path(data[k])
        return cls(**data)


@dataclass(frozen=True)
class Toolchain:
    jobs: int
    ccache_dir: Path | None
    cache_root: Path

    def make_args(self) -> list[str]:
        args = [f"-j{self.jobs}"]
        if self.ccache_dir is not None:
            args.append("CC=ccache gcc")
        return args

    def env(self) -> dict[str, str]:
        if self.ccache_dir is None:
            return {}
        return {"CCACHE_DIR": str(self.ccache_dir), "CCACHE_BASEDIR": str(self.cache_root),
                "CCACHE_NOHASHDIR": "1", "CCACHE_MAXSIZE": "8G", "CCACHE_COMPILERCHECK": "content"}


def default_toolchain(cache_root: Path, jobs: int = 0, use_ccache: bool = True) -> Toolchain:
    ccache = shutil.which("ccache") if use_ccache else None
    return Toolchain(jobs=jobs or os.cpu_count() or 1,
                     ccache_dir=(cache_root / "ccache") if ccache else None,
                     cache_root=cache_root)


def existing(build_dir: Path) -> Kernel | None:
    """The finished build in ``build_dir``, or None.  Only ``out/build.json`` (written
    last, atomically) makes a build finished, and its artifacts must be in ``out/``."""
    stamp = build_dir / "out" / "build.json"
    if not stamp.is_file():
        return None
    try:
        kernel = Kernel.load(stamp)
    except (OSError, ValueError, TypeError):
        return None
    out = (build_dir / "out").resolve()
    if all(p.is_file() and p.resolve().parent == out for p in (kernel.bzimage, kernel.modules_img)):
        return kernel
    return None


# --- running next to another harness run, and after a killed one -----------------------

@contextlib.contextmanager
def exclusive(lock: Path, waiting: str) -> Iterator[None]:
    """Hold an flock on ``lock`` (created if needed); print ``waiting`` if another
    process holds it, then wait.  The lock goes with the process, also on SIGKILL."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            runner.echo(f"  {waiting} (lock {lock}) ...")
            start = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            runner.echo(f"  ... got {lock.name} after {time.monotonic() - start:.0f}s")
        yield


def die_with_harness(argv: Sequence[str | os.PathLike]) -> list[str]:
    """``argv`` run under ``setpriv --pdeathsig KILL``: the command gets SIGKILL when the
    harness dies (even by SIGKILL), instead of writing on into a dir nobody owns."""
    argv = [os.fspath(a) for a in argv]
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv] if shutil.which("setpriv") else argv


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        fields = runner.proc_stat(pid)
        if fields is None:
            break
        pid = int(fields[1])
    return pids


def users_of(path: Path) -> list[int]:
    """Pids of processes working in ``path`` (this process and its ancestors aside): the
    path on their command line (make O=..., mke2fs -d ...), or their cwd in it unless they
    lead a session (a user's shell sitting there is left alone)."""
    inside, mine = str(path) + "/", _ancestors()
    found = []
    for pid in runner.pids():
        proc = Path(f"/proc/{pid}")
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(proc / "cwd") + "/"
        except OSError:
            continue
        fields = runner.proc_stat(pid)
        if fields is None:
            continue
        session = int(fields[3])
        named = any(a == str(path) or inside in a + "/" for a in args)
        if pid not in mine and (named or (cwd.startswith(inside) and session != pid)):
            found.append(pid)
    return found


def remove_leftovers(path: Path, what: str) -> None:
    """Stop what a killed run left working in ``path`` and remove it.  The caller holds
    the lock of ``path``, so nothing alive has the right to be there."""
    for _ in range(50):
        pids = users_of(path)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    runner.echo(f"  removing {what} {path} (left by a killed or failed run; nothing in it is reused)")
    unmount_under(path)
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def mounts_under(path: Path) -> list[str]:
    inside = str(path) + "/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if (point + "/").startswith(inside):
                found.append(point)
    return found


def unmount_under(path: Path) -> None:
    """Lazily unmount what a killed chroot tool (mmdebstrap) left mounted in ``path``; raise
    if anything stays, so that no removal ever walks into a mounted /proc, /sys or /dev."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        runner.run(["umount", "-l", point], check=False)
    if left := mounts_under(path):
        raise errors.CacheUnusable(path=path, reason=f"still mounted inside: {', '.join(left[:3])}",
                                   fix=f"unmount them (umount -l) and remove {path}")


class Progress:
    """Shows a line every ``every`` seconds instead of every compiler line."""

    def __init__(self, label: str, every: float = 20.0) -> None:
        self.label, self.every = label, every
        self.count, self.last = 0, time.monotonic()

    def __call__(self, line: str) -> bool:
        if re.match(r"^\s+(CC|LD|AR|AS)\b", line):
            self.count += 1
        if ERROR_LINE.search(line):
            return True
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            runner.echo(f"  [{self.label}] {self.count} objects, at: {line.strip()[:90]}")
        return False


def error_lines(log: Path, limit: int = 25) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    hits = [ln for ln in lines if ERROR_LINE.search(ln) and not ln.startswith("+ ")]
    return hits[:limit]


def _make(src: Path, obj: Path, targets: Sequence[str], tc: Toolchain, log: Path,
          label: str, extra: Sequence[str] = ()) -> None:
    rc = runner.run_logged(die_with_harness(["make", "-C", src, f"O={obj}", *tc.make_args(), *extra,
                                             *targets]),
                           log, env=tc.env(), show=Progress(label))
    if rc != 0:
        for line in error_lines(log):
            runner.echo(f"  | {line}")
        raise errors.BuildFailed(build_dir=obj, reason=f"make {' '.join(targets)} exited {rc}", log=log)


def modules_image(modroot: Path, release: str, dest: Path) -> None:
    """An ext4 image holding lib/modules/<release>, made without loop mounts."""
    tree = modroot / "lib" / "modules"
    size_kb = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file()) // 1024
    size_mb = max(16, size_kb // 1024 * 2 + 16)
    tmp = dest.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    runner.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "ovlmodules", "-E", "root_owner=0:0",
                "-d", tree, tmp, f"{size_mb}M"], env={"E2FSPROGS_FAKE_TIME": "1"})
    tmp.replace(dest)


def compile_tree(src: Path, obj: Path, fragments: Sequence[kconfig.Fragment], tc: Toolchain,
                 log: Path, label: str, *, reconfigure: bool = True) -> tuple[Path, str]:
    """Configure ``obj`` from the fragments and make bzImage + modules in it.

    Incremental when ``obj`` already holds a build: kbuild only recompiles what
    changed.  ``reconfigure=False`` keeps a ``.config`` already made from the same
    fragments (kbuild itself re-syncs it when a Kconfig file changed, silently:
    so the kept config is validated again after make, and an option an edited
    Kconfig dropped is named).  Returns the validated config and the kernel release.
    """
    config = obj / ".config"
    if reconfigure or not config.is_file():
        with runner.phase(f"{label}: config"):
            config = kconfig.make_config(src, obj, list(fragments), make_args=tc.make_args(), log=log)
    else:
        runner.echo(f"  {label}: config kept ({config}, same fragments)")
    with runner.phase(f"{label}: bzImage + modules (log: {log})"):
        _make(src, obj, ["bzImage", "modules"], tc, log, label)
    if not reconfigure:
        kconfig.validate(kconfig.requested(fragments), config, kconfig.AFTER_RESYNC)
    return config, (obj / "include" / "config" / "kernel.release").read_text().strip()


def package(src: Path, obj: Path, config: Path, release: str, tc: Toolchain, log: Path,
            out: Path, label: str) -> None:
    """bzImage, config and the modules image into ``out`` (replaced atomically)."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with runner.phase(f"{label}: modules_install + modules image"):
        modroot = out.with_name("modroot")
        shutil.rmtree(modroot, ignore_errors=True)
        _make(src, obj, ["modules_install"], tc, log, label,
              extra=[f"INSTALL_MOD_PATH={modroot}", "INSTALL_MOD_STRIP=1", "DEPMOD=/sbin/depmod"])
        modules_image(modroot, release, staging / "modules.ext4")
        shutil.rmtree(modroot, ignore_errors=True)
    shutil.copy2(obj / "arch" / "x86" / "boot" / "bzImage", staging / "bzImage")
    shutil.copy2(config, staging / "config")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def write_stamp(kernel: Kernel) -> None:
    out = kernel.bzimage.parent
    tmp = out / "build.json.tmp"
    tmp.write_text(kernel.to_json())
    tmp.replace(out / "build.json")


def build(inputs: BuildInputs, builds_root: Path, tc: Toolchain) -> Kernel:
    """Build (or reuse) the kernel for ``inputs``; one build per key at a time."""
    build_dir = builds_root / inputs.dirname()
    if (done := existing(build_dir)) is not None:
        runner.echo(f"  {inputs.label}: up to date in {build_dir} (nothing rebuilt)")
        return done
    with exclusive(builds_root / f"{inputs.dirname()}.lock",
                   f"{inputs.label}: another harness run is building {build_dir}; waiting for it"):
        if (done := existing(build_dir)) is not None:
            runner.echo(f"  {inputs.label}: built by the other run in {build_dir} (reused)")
            return done
        if build_dir.exists():
            remove_leftovers(build_dir, "the unfinished build")
        for trash in builds_root.glob(f".trash-*/{inputs.dirname()}"):
            shutil.rmtree(trash.parent, ignore_errors=True)
        return _build_locked(inputs, build_dir, tc)


def _build_locked(inputs: BuildInputs, build_dir: Path, tc: Toolchain) -> Kernel:
    start = time.monotonic()
    src, obj, out = build_dir / "src", build_dir / "obj", build_dir / "out"
    log = build_dir / "build.log"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    series = inputs.series or Series(Path("none"), ())
    with runner.phase(f"{inputs.label}: source ({len(series)} patches)"):
        prepare_source(inputs.tree_path, series, src)
    config, release = compile_tree(src, obj, inputs.fragments, tc, log, inputs.label)
    package(src, obj, config, release, tc, log, out, inputs.label)
    kernel = Kernel(label=inputs.label, version=inputs.version, key=inputs.key(), build_dir=build_dir,
                    bzimage=out / "bzImage", modules_img=out / "modules.ext4", config=out / "config",
                    release=release,
                    series=[p.name for p in series.patches],
                    series_hash=series.fingerprint() if len(series) else "none",
                    config_hash=kconfig.fingerprint(inputs.fragments),
                    seconds=round(time.monotonic() - start, 1))
    write_stamp(kernel)
    runner.echo(f"  {inputs.label}: built {release} in {kernel.seconds:.0f}s -> {out}")
    return kernel
