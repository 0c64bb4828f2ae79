"""``invoke ci`` in lanes: every shard in a process of its own, ``ovl.ci_lanes`` at once.

Shards are independent (each writes only its ``results/shards/<shard>/``; kernel
builds and images wait on per-key locks and reuse; guests have per-run dirs),
and a TCG guest keeps about one core busy, so on a machine of N cores N shards
at once take about 1/N of the guest-bound time.

:func:`vm.ci.run_all` calls :func:`run`, which writes the settings and the plan
into ``results/shards/lanes.json`` and starts ``python -m vm.lanechild <that
file> <shard>`` (cwd: the checkout) for each shard in plan order, at most
``lanes`` at once, each in a session of its own; the child
(:mod:`vm.lanechild`, above :mod:`vm.ci`, so this module never imports it)
reads them back and runs :func:`vm.ci.run_shard` for its shard, exactly as
``invoke ci --shard NAME`` would.  Every line a child prints reaches the
terminal as ``[<shard>] line`` and ``results/shards/<shard>.log`` (beside the
shard's dir, which the shard empties when it starts).  A failed shard stops new
starts and the running ones finish; Ctrl-C, SIGTERM or an error in the parent
ends every running child's process group (SIGTERM, then SIGKILL after a grace
period).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from vm import errors, runner
from vm.settings import Settings
from vm.suites import merge

#: the parent's settings and plan, for its children: ``<results>/shards/lanes.json``
PLAN_FILE = "lanes.json"
#: what a child runs: ``python -m vm.lanechild PLAN_FILE SHARD``
CHILD_MODULE = "vm.lanechild"
#: seconds a stopped child gets to clean up before SIGKILL: its own builds get 15 s (runner._stop_group)
GRACE = 30.0
#: seconds between two looks at the running children
POLL = 0.1
#: seconds to wait for the rest of an ended child's output (a process that escaped its group may hold the pipe)
DRAIN = 5.0

#: (plan file, shard name) -> the child's command line
Command = Callable[[Path, str], Sequence[str]]
#: prints one line of the run (a child's, prefixed, or the parent's own)
Emit = Callable[[str], None]
#: a shard's results dir (vm.ci.shard_dir)
ShardDir = Callable[[Settings, str], Path]


@dataclass(frozen=True)
class Plan:
    """What the parent hands its children: its settings, the tier's phases (``Phase.to_dict()``
    each) and which tier."""

    settings: Settings
    phases: tuple[Mapping[str, Any], ...]
    full: bool

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps({"settings": self.settings.to_dict(), "full": self.full,
                                   "phases": [dict(p) for p in self.phases]}, indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
            return cls(Settings.from_mapping(data["settings"]), tuple(dict(p) for p in data["phases"]),
                       bool(data["full"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise errors.BadArgument(what=f"{path} is not a plan `invoke ci` wrote for its lanes ({exc})",
                                     fix="run `invoke ci` (or `invoke ci --shard NAME` for one shard)") from exc


@dataclass(frozen=True)
class Job:
    """One shard to run as a child process."""

    name: str
    argv: tuple[str, ...]
    cwd: Path
    log: Path


@dataclass(frozen=True)
class Ended:
    """A child that ran: its exit status (negative: the signal that ended it) and wall time."""

    name: str
    returncode: int
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def status(self) -> str:
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exit status {self.returncode}"


def child_command(plan_file: Path, shard: str) -> list[str]:
    return [sys.executable, "-m", CHILD_MODULE, str(plan_file), shard]


def log_path(shard_dir: Path) -> Path:
    """``results/shards/<shard>.log``: not inside the shard's dir, which run_shard empties."""
    return shard_dir.parent / f"{shard_dir.name}.log"


def printer() -> Emit:
    """Whole lines on stdout, one at a time, whichever thread prints."""
    lock = threading.Lock()

    def emit(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    return emit


# --- the parent ----------------------------------------------------------------------------

def run(s: Settings, phases: Sequence[Any], full: bool, shard_dir: ShardDir, started: Callable[[Path], None],
        *, command: Command | None = None, emit: Emit | None = None, grace: float | None = None) -> list[Ended]:
    """Every shard of ``phases`` (:class:`vm.ci.Phase`) as a child, ``s.ci_lanes`` at once, in
    the order their first phase appears; ``started(dir)`` for each that left a shard dir to
    merge.  Raises :class:`~vm.errors.ShardsFailed` once the running children have finished
    when one failed (no new one starts after a failure).

    ``command``, ``emit`` and ``grace`` default to :func:`child_command`, :func:`printer` and
    :data:`GRACE`, looked up when called."""
    command, emit = command or child_command, emit or printer()
    grace = GRACE if grace is None else grace
    plan = Plan(s, tuple(p.to_dict() for p in phases), full)
    plan_file = plan.write(shard_dir(s, PLAN_FILE))        # results/shards/lanes.json
    jobs = [Job(name, tuple(command(plan_file, name)), s.project_root, log_path(shard_dir(s, name)))
            for name in dict.fromkeys(p.shard for p in phases)]
    ended: list[Ended] = []

    def on_end(end: Ended) -> None:
        ended.append(end)
        if (shard_dir(s, end.name) / merge.MANIFEST).is_file():
            started(shard_dir(s, end.name))

    t0 = time.monotonic()
    try:
        with runner.sigterm_interrupts():
            schedule(jobs, s.ci_lanes, emit, on_end, grace=grace,
                     prepare=lambda job: shutil.rmtree(shard_dir(s, job.name), ignore_errors=True))
    finally:
        emit(timing(jobs, ended, time.monotonic() - t0, s.ci_lanes))
    failed = [e.name for e in ended if not e.ok]
    if failed:
        raise errors.ShardsFailed(count=len(failed), shards=", ".join(failed),
                                  report=s.results_dir / merge.SUMMARY)
    return ended


def schedule(jobs: Sequence[Job], lanes: int, emit: Emit, on_end: Callable[[Ended], None], *,
             grace: float = GRACE, prepare: Callable[[Job], None] = lambda job: None) -> None:
    """Start ``jobs`` in order, at most ``lanes`` at once, the next when one ends (``prepare``
    first: :func:`run` removes the shard's old dir, so a child that dies before its shard
    starts leaves no verdict of a previous run); after a failure start none and let the
    running ones finish.  Whatever ends the wait (Ctrl-C, an error) stops every running
    child's process group first."""
    waiting, running = list(jobs), []
    try:
        while waiting or running:
            while waiting and len(running) < lanes:
                prepare(waiting[0])
                running.append(Lane.launch(waiting.pop(0), emit))
            time.sleep(POLL)
            for lane in [r for r in running if r.proc.poll() is not None]:
                end = lane.finish(grace)
                running.remove(lane)
                on_end(end)
                if not end.ok:
                    emit(failure(end, waiting, running))
                    waiting.clear()
    finally:
        _stop(running, grace, emit, on_end)


def _stop(running: list["Lane"], grace: float, emit: Emit, on_end: Callable[[Ended], None]) -> None:
    if not running:
        return
    emit(f"lanes: stopping {', '.join(r.job.name for r in running)} (SIGTERM, SIGKILL after {grace:g} s)")
    runner.stop_groups([r.proc for r in running], grace)
    for lane in running:
        end = lane.finish(grace)
        on_end(end)
        if not end.ok:
            emit(failure(end, [], []))


def failure(end: Ended, waiting: Sequence[Job], running: Sequence["Lane"]) -> str:
    """The one line a failed shard gets: its name, exit status and log (and what is not started)."""
    line = f"lanes: shard {end.name} failed ({end.status}); log: {end.log}"
    if waiting:
        line += (f"; not starting {', '.join(j.name for j in waiting)}, waiting for "
                 f"{', '.join(r.job.name for r in running) or 'nothing'}")
    return line


def timing(jobs: Sequence[Job], ended: Sequence[Ended], total: float, lanes: int) -> str:
    """``lanes: unit 58.1 s, lint-7.2 7.0 s, ...; total 301.4 s in 2 lanes`` (plan order)."""
    took = {e.name: e.seconds for e in ended}
    shards = ", ".join(f"{j.name} {took[j.name]:.1f} s" for j in jobs if j.name in took) or "no shard ran"
    skipped = [j.name for j in jobs if j.name not in took]
    rest = f" (not run: {', '.join(skipped)})" if skipped else ""
    return f"lanes: {shards}; total {total:.1f} s in {lanes} lane{'s' if lanes != 1 else ''}{rest}"


class Lane:
    """A running child: its process (a group of its own) and the thread copying its output."""

    def __init__(self, job: Job, proc: subprocess.Popen, reader: threading.Thread) -> None:
        self.job, self.proc, self.reader = job, proc, reader
        self.t0 = time.monotonic()

    @classmethod
    def launch(cls, job: Job, emit: Emit) -> "Lane":
        proc = runner.start(job.argv, cwd=job.cwd, env={"PYTHONUNBUFFERED": "1"})
        reader = threading.Thread(target=_copy, args=(proc, job, emit), name=f"lane-{job.name}", daemon=True)
        reader.start()
        return cls(job, proc, reader)

    def finish(self, grace: float) -> Ended:
        """Once the child has exited: end what it left in its group, then its output's last lines."""
        seconds = time.monotonic() - self.t0
        runner.stop_groups([self.proc], grace)
        self.reader.join(DRAIN)
        rc = self.proc.poll()
        return Ended(self.job.name, -signal.SIGKILL if rc is None else rc, round(seconds, 1), self.job.log)


def _copy(proc: subprocess.Popen, job: Job, emit: Emit) -> None:
    """Every line of the child into its log and, prefixed with ``[<shard>] ``, to ``emit``."""
    assert proc.stdout is not None
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w", encoding="utf-8", errors="replace") as fh, proc.stdout:
        fh.write(f"+ (cd {shlex.quote(str(job.cwd))} && {shlex.join(job.argv)})\n")
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            emit(f"[{job.name}] {line.rstrip(chr(10))}")


def die_with_parent() -> None:
    """SIGTERM (a clean stop, see :func:`vm.runner.sigterm_interrupts`) when the parent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
