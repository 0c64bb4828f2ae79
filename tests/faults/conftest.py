"""Fault tests: harness runs as real processes (``python -m invoke ...``), started
together or killed with SIGKILL at a chosen moment, against the real cache.

A killed run gets a *fault cache* of its own: a temporary cache dir next to the
real one (same filesystem, so hard-linked source copies work) whose chosen
subdirs are symlinks to the real cache's (sources, ccache, built kernels,
images, the SSH key, the KVM verdict) and whose others start empty; a rebuild
there gets ccache hits, and the real cache is never touched by a killed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from vm.kernel.build import users_of
from vm.runner import pid_alive, pids
from vm.settings import Settings, load

ROOT = Path(__file__).resolve().parents[2]


def real_settings() -> Settings:
    return load()


def make_fault_cache(links: tuple[str, ...]) -> Path:
    """A temp cache dir whose ``links`` subdirs point to the real cache's (which must exist)."""
    real = real_settings().cache_dir
    missing = [name for name in links if not (real / name).is_dir()]
    if missing:
        pytest.skip(f"the real cache {real} has no {', '.join(missing)}: run `invoke build boot` first")
    cache = Path(tempfile.mkdtemp(prefix="ovl-faults-", dir=real.parent))
    for name in links:
        (cache / name).symlink_to(real / name)
    return cache


def settings_for(cache: Path) -> Settings:
    return dataclasses.replace(real_settings(), cache_dir=cache.resolve())


class Harness:
    """One ``python -m invoke ARGS`` run in its own session, output in ``log``."""

    def __init__(self, args: list[str], cache: Path | None, log: Path, results: Path | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cache is not None:
            env["INVOKE_OVL_CACHE_DIR"] = str(cache)
        if results is not None:
            env["INVOKE_OVL_RESULTS_DIR"] = str(results)
        self.args, self.log = args, log
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.ended: float | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            pytest.fail(f"`invoke {' '.join(self.args)}` did not end within {timeout:.0f}s:\n"
                        f"{self.output()[-3000:]}")
        self.ended = time.monotonic()
        return rc

    def check(self, timeout: float) -> str:
        rc = self.wait(timeout)
        assert rc == 0, f"`invoke {' '.join(self.args)}` exited {rc}:\n{self.output()[-4000:]}"
        return self.output()

    def sigkill(self) -> None:
        """SIGKILL the harness process alone (not its children: they must go by themselves)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def kill_group(self) -> None:
        """Cleanup: whatever is left of this run's session (all started by this test)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@pytest.fixture
def harnesses():
    """Start harness runs; at the end nothing any of them started is left running."""
    started: list[Harness] = []

    def start(args: list[str], cache: Path | None, log: Path, results: Path | None = None) -> Harness:
        started.append(Harness(args, cache, log, results))
        return started[-1]

    yield start
    for h in started:
        h.kill_group()


def wait_until(check: Callable[[], object], timeout: float, what: str, harness: Harness | None = None):
    """Poll ``check`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if harness is not None and harness.proc.poll() is not None:
            pytest.fail(f"the harness exited {harness.proc.returncode} before {what}:\n{harness.output()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}"
                + (f":\n{harness.output()[-3000:]}" if harness else ""))


def leftovers(path: Path, timeout: float = 10.0) -> list[str]:
    """Processes still working in ``path`` once ``timeout`` s have passed (or none, sooner)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = users_of(path)
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found = []
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {args[:200]}")
        except OSError:
            pass
    return found


def qemus_under(path: Path) -> list[int]:
    """Live (non-zombie) QEMU processes whose command line names something under ``path``."""
    found = []
    for pid in pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and f"{path}/" in cmdline and pid_alive(pid):
            found.append(pid)
    return found


def remove_fault_cache(cache: Path) -> None:
    """The temp cache, never what its symlinks point to (rmtree does not follow them)."""
    for pid in qemus_under(cache):            # only ever QEMUs this test's runs started
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(cache, ignore_errors=True)
