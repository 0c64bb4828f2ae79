"""The one way the harness runs external commands.

Every command is a list of arguments (never ``shell=True``), is echoed as a
copy-pasteable :func:`shlex.join` line before it runs, and fails with a
:class:`~vm.errors.CommandFailed` that carries the exit code and the last
lines of its output.  Long-running commands can stream into a log file while
a filter decides which lines reach the terminal.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from vm import errors

Cmd = Sequence["str | os.PathLike[str]"]


@dataclass(frozen=True)
class Result:
    cmd: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _argv(cmd: Cmd) -> list[str]:
    return [os.fspath(c) for c in cmd]


def echo(line: str, *, stream=None) -> None:
    print(line, file=stream or sys.stderr, flush=True)


def announce(argv: Sequence[str], cwd: "os.PathLike[str] | str | None" = None) -> None:
    prefix = f"(cd {shlex.quote(os.fspath(cwd))} && " if cwd else ""
    suffix = ")" if cwd else ""
    echo(f"+ {prefix}{shlex.join(argv)}{suffix}")


def tail(text: str, lines: int = 5) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)


def _prepare(cmd: Cmd, cwd: "os.PathLike[str] | str | None", *, quiet: bool = False) -> list[str]:
    """``cmd`` as argv, announced as a copy-pasteable line (unless ``quiet``); a program
    that is not there is a :class:`~vm.errors.MissingTool`, before anything starts."""
    argv = _argv(cmd)
    if not quiet:
        announce(argv, cwd)
    if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        raise errors.MissingTool(tool=argv[0], package=argv[0])
    return argv


def run(cmd: Cmd, *, cwd: "os.PathLike[str] | str | None" = None,
        env: Mapping[str, str] | None = None, check: bool = True,
        capture: bool = True, timeout: float | None = None,
        input: str | None = None, quiet: bool = False,
        fix: str = "see the command's output above") -> Result:
    """Run ``cmd`` to completion and return its :class:`Result`."""
    argv = _prepare(cmd, cwd, quiet=quiet)
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(argv, cwd=cwd, env=full_env, input=input, text=True,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise errors.CommandFailed(cmd=shlex.join(argv), rc="nothing (timed out)",
                                   detail=f" after {timeout:.0f}s", fix=fix) from exc
    res = Result(tuple(argv), proc.returncode, proc.stdout or "", proc.stderr or "")
    if check and not res.ok:
        detail = tail(res.stderr or res.stdout)
        raise errors.CommandFailed(cmd=shlex.join(argv), rc=res.returncode,
                                   detail=f": {detail}" if detail else "", fix=fix)
    return res


def run_logged(cmd: Cmd, log: Path, *, cwd: "os.PathLike[str] | str | None" = None,
               env: Mapping[str, str] | None = None,
               show: Callable[[str], bool] = lambda line: False,
               timeout: float | None = None, new_session: bool = False) -> int:
    """Run ``cmd`` with stdout+stderr appended to ``log``; return the exit code.

    Lines for which ``show(line)`` is true are echoed to the terminal, so a
    build can print progress without flooding it.  The caller interprets a
    non-zero exit (it knows which lines of the log matter).

    ``new_session`` runs the command in its own session, so a Ctrl-C reaches
    only the harness, which then stops the command's whole process group
    (SIGTERM, then SIGKILL) before cleaning up after it.
    """
    argv = _prepare(cmd, cwd)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    log.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout if timeout else None
    with open(log, "a", encoding="utf-8", errors="replace") as fh:
        fh.write(f"+ {shlex.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=full_env, text=True, errors="replace",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=new_session)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                if show(line):
                    echo(line.rstrip())
                if deadline and time.monotonic() > deadline:
                    raise errors.CommandFailed(cmd=shlex.join(argv), rc="nothing (timed out)",
                                               detail=f" after {timeout:.0f}s",
                                               fix=f"see {log}")
            return proc.wait()
        finally:
            if proc.poll() is None:
                if new_session:
                    _stop_group(proc)
                else:
                    proc.kill()
                    proc.wait()


def start(cmd: Cmd, *, cwd: "os.PathLike[str] | str | None" = None,
          env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session and return at once: stdin closed, stdout and stderr
    on one text pipe (``proc.stdout``, read it line by line as it comes).

    For a caller that runs several commands side by side: a Ctrl-C reaches only the
    harness, which then ends each one's whole group with :func:`stop_groups`."""
    argv = _prepare(cmd, cwd)
    return subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, text=True, errors="replace",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group led by ``proc``, SIGKILL what is left after ``grace`` s.

    Returns once the group is empty (zombies aside), so the caller may clean up
    the files its members were using.
    """
    stop_groups([proc], grace)


def stop_groups(procs: Sequence[subprocess.Popen], grace: float = 15.0) -> None:
    """:func:`_stop_group` for several groups at once (each led by a command :func:`start`
    ran in its own session): every group gets SIGTERM, then SIGKILL for what is left after
    ``grace`` s, so the wait is ``grace`` once, not once per group.  Returns once every group
    is empty (zombies aside); a group already empty is skipped."""
    left = list(procs)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = [p for p in left if _signal_group(p, sig)]
        if not left or _wait_groups_gone(left, wait):
            break
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _signal_group(proc: subprocess.Popen, sig: int) -> bool:
    """Send ``sig`` to the group ``proc`` leads; False when the group is gone."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_groups_gone(procs: Sequence[subprocess.Popen], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for proc in procs:
            proc.poll()                  # reap the leader, so it does not count as alive
        if not any(group_alive(p.pid) for p in procs):
            return True
        time.sleep(0.05)
    return False


def pids() -> list[int]:
    """Every pid in /proc now. Only the directory is read: a glob such as
    ``/proc/[0-9]*/cmdline`` stats each entry, and a process exiting in between
    makes that stat raise ProcessLookupError (seen in CI)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp,
    session, ...), or None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def group_alive(pgid: int) -> bool:
    """True while a process other than a zombie is in the group."""
    for pid in pids():
        fields = proc_stat(pid)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase of work and report it, tuxmake style."""
    echo(f"==> {name}")
    start = time.monotonic()
    ok = False
    try:
        yield
        ok = True
    finally:
        took = time.monotonic() - start
        echo(f"<== {name}: {'done' if ok else 'FAILED'} in {took:.1f}s")


def require(tool: str, package: str | None = None) -> str:
    path = shutil.which(tool)
    if path is None:
        raise errors.MissingTool(tool=tool, package=package or tool)
    return path


@dataclass(frozen=True)
class Until:
    """What :func:`run_until` saw: seconds from the start to the first line ``until`` accepted
    (None if none did), that line, the exit code (None when it was stopped after the match)
    and the last lines of its output."""

    seconds: float | None
    line: str
    returncode: int | None
    tail: str


def run_until(cmd: Cmd, log: Path, until: Callable[[str], bool], *, timeout: float,
              env: Mapping[str, str] | None = None, cwd: "os.PathLike[str] | str | None" = None) -> Until:
    """Run ``cmd`` (its own session, stdout+stderr into ``log``) until a line makes ``until``
    true, then stop its process group; or until it exits, or ``timeout`` s pass (stopped too).
    Times a boot to its first sign of life without waiting for what follows."""
    argv = _prepare(cmd, cwd)
    log.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    start = time.monotonic()
    with open(log, "w", encoding="utf-8", errors="replace") as fh:
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            found = _watch(proc, fh, lines, until, start + timeout)
        finally:
            if proc.poll() is None:
                _stop_group(proc, grace=2.0)
    seconds = None if found is None else found[0] - start
    return Until(seconds, found[1] if found else "", proc.returncode if found is None else None,
                 tail("\n".join(lines), 3))


def _watch(proc: subprocess.Popen, fh, lines: list[str], until: Callable[[str], bool],
           deadline: float) -> tuple[float, str] | None:
    """Read ``proc``'s output line by line (into ``fh`` and ``lines``) until ``until`` accepts
    one: ``(time.monotonic() then, line)``; None when it exits or ``deadline`` passes."""
    import select

    assert proc.stdout is not None
    pending = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], min(0.05, max(0.0, deadline - time.monotonic())))
        if not ready:
            if proc.poll() is not None:
                return None
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            proc.wait()
            return None
        pending += chunk
        *complete, pending = pending.replace(b"\r", b"").split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            fh.write(line + "\n")
            lines.append(line)
            if until(line):
                return time.monotonic(), line
    return None


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (in the main thread), so the ``finally`` clauses run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)
