"""`invoke bench`'s measurements: each a small function returning table rows (vm.bench).

Every measurement runs the harness's own code (the build of vm.kernel.build,
pipeline.boot, the scenario suite) or the harness's commands as whole processes,
``repeat`` times; a measurement that cannot run here gives one row saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from vm import bench, pipeline, runner
from vm.kernel import build
from vm.kernel.patch import prepare_source
from vm.settings import Settings

#: the overlayfs file an incremental build and the reload path touch; the reboot path's
TOUCH_OVL, TOUCH_CORE = "fs/overlayfs/util.c", "fs/super.c"


@dataclass
class Bench:
    """One `invoke bench` run: settings, samples per measurement, where its logs go."""

    settings: Settings
    repeat: int
    dev_tree: Path | None = None
    out: Path = Path("results/bench")
    accel: str = ""
    kernels: dict[str, str] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    def tree(self):
        if "tree" not in self._cache:
            self._cache["tree"] = pipeline.get_tree(self.settings)
        return self._cache["tree"]

    def kernel(self, virtme: bool = False) -> build.Kernel:
        """The patched kernel (scenario config), or with ``virtme`` the bench-virtme one."""
        key = "virtme" if virtme else "patched"
        if key not in self._cache:
            s = virtme_settings(self.settings) if virtme else self.settings
            k = pipeline.build_kernel(s, pipeline.Variant.parse(pipeline.PATCHED), self.tree())
            self.kernels[f"{key} ({k.build_dir.name})"] = k.release
            self._cache[key] = k
        return self._cache[key]

    def image(self):
        if "image" not in self._cache:
            self._cache["image"] = pipeline.guest_image(self.settings)
        return self._cache["image"]


def virtme_settings(settings: Settings) -> Settings:
    """``ovl.fragments`` + ``ovl.bench_virtme_fragment``: a build key of its own."""
    extra = settings.bench_virtme_fragment
    return replace(settings, fragments=settings.fragments + (() if extra in settings.fragments else (extra,)))


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


# --- build ------------------------------------------------------------------------

def touch(path: Path) -> None:
    """A new mtime on ``path`` without touching other hard links of it (the pristine tree
    and other builds share inodes with a build's ``src/``): rewrite it as a file of its own."""
    tmp = path.with_name(f".{path.name}.bench-tmp")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)
    os.utime(path)


def incremental(b: Bench) -> list[bench.Row]:
    """Touch fs/overlayfs/util.c in the kept patched build and rebuild (kbuild in its ``O=``),
    holding that build's lock, as :func:`vm.kernel.build.build` does."""
    kernel, s = b.kernel(), b.settings
    tc = build.default_toolchain(s.cache_dir, s.jobs, s.ccache)
    src, obj = kernel.build_dir / "src", kernel.build_dir / "obj"
    log = b.out / "incremental-build.log"
    samples = []
    with build.exclusive(kernel.build_dir.parent / f"{kernel.build_dir.name}.lock", "bench: waiting for the build"):
        for _ in range(b.repeat):
            touch(src / TOUCH_OVL)
            samples.append(timed(lambda: build.compile_tree(src, obj, pipeline.fragments(s, False), tc, log,
                                                             "bench-incremental")))
    return [bench.Row(f"build: incremental (touch {TOUCH_OVL}, config + make)", tuple(samples),
                      f"kept O= of {kernel.build_dir.name}")]


def cold(b: Bench) -> list[bench.Row]:
    """A cold build: its own empty ccache dir and a fresh ``O=`` each time (minutes)."""
    s, tree = b.settings, b.tree()
    scratch = s.sub("bench") / f"cold-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    samples = []
    try:
        src = prepare_source(tree.path, pipeline.series_for(s, pipeline.Variant.parse(pipeline.PATCHED)),
                             scratch / "src")
        for i in range(b.repeat):
            tc = replace(build.default_toolchain(scratch, s.jobs, s.ccache), ccache_dir=scratch / f"ccache-{i}")
            obj = scratch / f"obj-{i}"
            samples.append(timed(lambda: build.compile_tree(src, obj, pipeline.fragments(s, False), tc,
                                                             b.out / "cold-build.log", "bench-cold")))
            shutil.rmtree(obj, ignore_errors=True)
            shutil.rmtree(scratch / f"ccache-{i}", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [bench.Row("build: cold (empty ccache, fresh O=, config + make)", tuple(samples))]


# --- boot -------------------------------------------------------------------------

BOOT = "boot: harness, first SSH command (in-process)"
SPLITS = (("  setup (accelerator, run dir, disks) -> QEMU spawned", "t0", "spawned"),
          ("  QEMU spawned -> kernel's first console line", "spawned", "kernel"),
          ("  kernel's first line -> ovl-init ready line", "kernel", "ready"),
          ("  ready line -> sshd answered (connect, auth, `true`)", "ready", "ssh"),
          ("  first command (`true`, connection open)", "ssh", "first"))


def boot_once(b: Bench) -> dict[str, float]:
    """One in-process boot through pipeline.boot, its timeline and kernel-clock milestones."""
    s, kernel, img = b.settings, b.kernel(), b.image()
    t0 = time.monotonic()
    g = pipeline.boot(s, kernel, img, pipeline.run_dir(s, f"bench-{kernel.label}"))
    try:
        g.run(["true"], check=True)
        marks = {"t0": t0, **g.timeline, "first": time.monotonic()}
        b.accel = f"{g.plan.spec.accel.name} ({g.plan.spec.accel.reason})"
        # after the clock stopped: the kernel's log (its KERN_INFO lines are not on the console)
        kernel_log = g.run(["dmesg"], check=True).stdout.splitlines()
    finally:
        g.stop()
        g.release()
    return {**marks, **{f"kernel:{k}": v for k, v in bench.kernel_milestones(kernel_log).items()}}


def boot_in_process(b: Bench) -> list[bench.Row]:
    runs = [boot_once(b) for _ in range(b.repeat)]
    rows = [bench.Row(BOOT, tuple(r["first"] - r["t0"] for r in runs),
                      f"SSH tries per boot: {', '.join(str(int(r.get('ssh_tries', 0))) for r in runs)}")]
    for name, a, z in SPLITS:
        if all(a in r and z in r for r in runs):
            rows.append(bench.Row(name, tuple(r[z] - r[a] for r in runs)))
    for key, what in (("kernel:rootfs", "root fs mounted"), ("kernel:init", "init started")):
        if all(key in r for r in runs):
            rows.append(bench.Row(f"  kernel clock: {what}", tuple(r[key] for r in runs), "printk time"))
    return rows


@contextlib.contextmanager
def private_cache(s: Settings):
    """A cache dir whose kernels, images, sources, ccache, key and KVM verdict are the real
    cache's but whose ``run/`` is its own: `invoke boot --detach` / `invoke stop` there see
    only the bench's guests, never another run's."""
    root = s.sub("bench") / f"proc-cache-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    for name in ("sources", "builds", "images", "ccache", "ssh", "accel"):
        s.sub(name).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (root / name).symlink_to(s.sub(name))
    try:
        yield root
    finally:
        invoke(s, root, "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def invoke(s: Settings, cache: Path | None, *args: str, check: bool = True) -> runner.Result:
    env = {"INVOKE_OVL_CACHE_DIR": str(cache)} if cache else {}
    return runner.run([sys.executable, "-m", "invoke", *args], cwd=s.project_root, env=env, check=check,
                      fix="run the same invoke command by hand to see why")


def boot_processes(b: Bench) -> list[bench.Row]:
    """`invoke boot --detach` then `invoke ssh -c true`, each a whole process, in a private run dir."""
    s, boots, sshs = b.settings, [], []
    b.kernel(), b.image()
    with private_cache(s) as cache:
        for _ in range(b.repeat):
            boots.append(timed(lambda: invoke(s, cache, "boot", "--detach", "--variant", pipeline.PATCHED)))
            sshs.append(timed(lambda: invoke(s, cache, "ssh", "-c", "true", "--variant", pipeline.PATCHED)))
            invoke(s, cache, "stop")
    return [bench.Row("boot: `invoke boot --detach` (process)", tuple(boots)),
            bench.Row("boot: then `invoke ssh -c true` (process)", tuple(sshs)),
            bench.Row("boot: both processes", tuple(x + y for x, y in zip(boots, sshs)))]
