"""Out-of-tree kernel builds keyed by what went into them.

A build lives in ``<cache>/builds/<label>-<version>-<key>/``:

- ``src/``  hard-linked copy of the pristine tree with the series applied,
- ``obj/``  the ``O=`` directory,
- ``out/``  the artifacts: ``bzImage``, ``modules.ext4``, ``config``, ``build.json``.

``key`` hashes the tree, the series and the config fragments, so unchanged
inputs never rebuild, and baseline and patched kernels never share a dir.
``src`` and ``obj`` sit side by side in every build, so with ccache's
``base_dir`` the compiler command lines are identical across builds and a
series prefix that only touches overlayfs recompiles only overlayfs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

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
    stamp = build_dir / "out" / "build.json"
    if not stamp.is_file():
        return None
    kernel = Kernel.load(stamp)
    if kernel.bzimage.is_file() and kernel.modules_img.is_file():
        return kernel
    return None


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
    rc = runner.run_logged(["make", "-C", src, f"O={obj}", *tc.make_args(), *extra, *targets],
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
                 log: Path, label: str) -> tuple[Path, str]:
    """Configure ``obj`` from the fragments and make bzImage + modules in it.

    Incremental when ``obj`` already holds a build: kbuild only recompiles what
    changed.  Returns the validated config and the kernel release.
    """
    with runner.phase(f"{label}: config"):
        config = kconfig.make_config(src, obj, list(fragments), make_args=tc.make_args(), log=log)
    with runner.phase(f"{label}: bzImage + modules (log: {log})"):
        _make(src, obj, ["bzImage", "modules"], tc, log, label)
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
    """Build (or reuse) the kernel for ``inputs``."""
    build_dir = builds_root / inputs.dirname()
    if (done := existing(build_dir)) is not None:
        runner.echo(f"  {inputs.label}: up to date in {build_dir} (nothing rebuilt)")
        return done
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
