"""`invoke bench`: the boots the harness is compared with, on the same machine in the same run.

- the floor: QEMU as the harness starts it, the same bzImage, no disk and no
  network, until the kernel's "VFS: Unable to mount root fs" panic;
- virtme-ng, installed by the bench alone into ``<cache>/bench/virtme-venv``
  (never a project dependency), booting the bench-virtme kernel (the scenario
  config + ``kconfig/bench-virtme.config``) to its first command's output.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vm import bench, errors, runner
from vm.benchrun import Bench
from vm.kernel.build import exclusive
from vm.machine import qemu


def accel(b: Bench) -> qemu.Accel:
    """The accelerator the harness's boots use here (the cached probe verdict)."""
    s = b.settings
    chosen = qemu.choose_accel(qemu.ARCHES[s.arch], s.accel, s.sub("accel"), s.kvm_probe_timeout)
    b.accel = b.accel or f"{chosen.name} ({chosen.reason})"
    return chosen


def bare_samples(b: Bench, kernel: Path, name: str) -> bench.Row:
    s, acc = b.settings, accel(b)
    argv = bench.bare_argv(qemu.ARCHES[s.arch], acc, kernel, s.memory_mb, s.cpus)
    samples = []
    for i in range(b.repeat):
        seen = runner.run_until(argv, b.out / f"bare-{name}-{i}.log", lambda line: bench.BARE_MARKER in line,
                                timeout=s.bench_boot_timeout)
        if seen.seconds is None:
            return bench.not_run(f"floor: bare QEMU to root-mount panic ({name})",
                                 f"no '{bench.BARE_MARKER}' (exit {seen.returncode}): {seen.tail}")
        samples.append(seen.seconds)
    return bench.Row(f"floor: bare QEMU to root-mount panic ({name})", tuple(samples), f"[{acc.name}]")


def bare(b: Bench) -> list[bench.Row]:
    return [bare_samples(b, b.kernel().bzimage, "patched kernel")]


VNG = "virtme-ng: `vng --run BZIMAGE --exec` to its first output"


def vng_binary(b: Bench) -> Path:
    """``vng`` from a venv under the cache, made (once, under a lock) with pip."""
    venv = b.settings.sub("bench") / "virtme-venv"
    vng = venv / "bin" / "vng"
    with exclusive(venv.with_suffix(".lock"), "bench: another run installs virtme-ng"):
        if not vng.is_file():
            runner.run([sys.executable, "-m", "venv", venv], fix="install python3-venv")
            runner.run([venv / "bin" / "pip", "install", "-q", b.settings.bench_virtme_package],
                       fix="check that PyPI is reachable")
    return vng


def vng(b: Bench) -> list[bench.Row]:
    try:
        binary = vng_binary(b)
        kernel = b.kernel(virtme=True)
    except errors.HarnessError as exc:
        return [bench.not_run(VNG, f"not run: {exc}")]
    rows = [bare_samples(b, kernel.bzimage, "bench-virtme kernel")]
    argv = bench.vng_argv(binary, kernel.bzimage, accel(b), b.settings.memory_mb, b.settings.cpus)
    samples = []
    for i in range(b.repeat):
        seen = runner.run_until(argv, b.out / f"vng-{i}.log", lambda line: line.strip() == bench.VNG_MARKER,
                                timeout=b.settings.bench_boot_timeout,
                                env={"PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        if seen.seconds is None:
            return rows + [bench.not_run(VNG, f"vng did not run its command (exit {seen.returncode}): "
                                              f"{seen.tail} (log {b.out / f'vng-{i}.log'})")]
        samples.append(seen.seconds)
    return rows + [bench.Row(VNG, tuple(samples), f"{b.settings.bench_virtme_package}, host root over 9p")]
