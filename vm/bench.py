"""`invoke bench`: what the harness's speed is made of (issue 13), as data.

Pure pieces only, tested without a VM: :class:`Stats` (min/median/max of the
samples), :class:`Row` (one measured line of the table, or why it was not
measured), the table renderer, ``results/bench.json`` with the host facts, the
selection of measurements (``--only``), the speed goals each row is judged
against, the parsers of what the measurements read (``retest:`` lines, kernel
console timestamps, a scenario's SSH round trips) and the command lines of the
two boots the harness is compared with: QEMU's bare boot to the root-mount panic
(the floor) and virtme-ng.  :mod:`vm.benchrun` takes the measurements.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from vm import errors
from vm.machine import qemu

#: every measurement `--only` can name, in the order the table shows them
MEASUREMENTS = ("build", "boot", "bare", "vng", "scenario", "suite", "edit")
#: `--cold` adds this one (minutes: its own empty ccache and O=)
COLD = "cold"
#: the marker of QEMU's bare boot: the kernel found no root filesystem
BARE_MARKER = "VFS: Unable to mount root fs"
#: what vng's first command prints, so its first output is unmistakable
VNG_MARKER = "ovl-bench-first-command"
NOT_RUN_EDIT = "not run (pass --dev-tree, a series branch from `invoke series checkout`)"
RETEST_MODES = ("module-reload", "reboot", "boot", "unchanged")


@dataclass(frozen=True)
class Stats:
    """min / median / max of a measurement's samples (seconds)."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        if not samples:
            raise ValueError("no samples")
        return cls(min(samples), statistics.median(samples), max(samples), len(samples))


@dataclass(frozen=True)
class Goal:
    """A speed goal of issue 13: ``median`` of the row must stay under ``limit`` seconds."""

    limit: float
    text: str

    def verdict(self, stats: Stats) -> str:
        if stats.median <= self.limit:
            return f"met ({self.text}; {self.limit - stats.median:.2f}s to spare)"
        return f"missed by {stats.median - self.limit:.2f}s ({self.text})"


#: row name -> the goal it is judged against
GOALS: Mapping[str, Goal] = {
    "boot: harness, first SSH command (in-process)": Goal(1.7, "boot to first SSH command < 1.7s"),
    "scenario: one row (median of the suite's rows)": Goal(1.5, "one scenario < 1.5s"),
    "edit-to-verdict: util.c, module reload": Goal(45.0, "edit -> verdict via module reload < 45s"),
    "edit-to-verdict: super.c, reboot": Goal(120.0, "edit -> verdict when rebooting < 2 min"),
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a measurement's samples, or the one-line reason it has none."""

    name: str
    samples: tuple[float, ...] = ()
    note: str = ""

    @property
    def stats(self) -> Stats | None:
        return Stats.of(self.samples) if self.samples else None

    @property
    def goal(self) -> str:
        goal, stats = GOALS.get(self.name), self.stats
        return goal.verdict(stats) if goal and stats else ""

    def to_dict(self) -> dict:
        stats = self.stats
        data: dict = {"name": self.name, "samples": [round(s, 3) for s in self.samples], "note": self.note}
        if stats:
            data.update(min=round(stats.min, 3), median=round(stats.median, 3), max=round(stats.max, 3))
        if self.goal:
            data["goal"] = self.goal
        return data


def not_run(name: str, why: str) -> Row:
    return Row(name, (), why.splitlines()[0] if why else "not run")


def select(only: str | None, cold: bool = False) -> tuple[str, ...]:
    """``--only build,boot`` -> those measurements in table order; none: all of them.
    ``cold`` adds the cold build (``--only cold`` asks for it too)."""
    names = [n.strip() for n in (only or "").split(",") if n.strip()]
    known = (COLD, *MEASUREMENTS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise errors.BadArgument(what=f"unknown measurement(s) {', '.join(unknown)}",
                                 fix=f"use --only with some of {', '.join(known)}")
    chosen = set(names) if names else set(MEASUREMENTS)
    if cold:
        chosen.add(COLD)
    return tuple(n for n in known if n in chosen)


# --- the table and the JSON -------------------------------------------------------

def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(rows: Iterable[Row], repeat: int) -> str:
    """The Markdown table: min/median/max in seconds, the goal verdict or the note."""
    lines = [f"| measurement (seconds, {repeat} runs) | min | median | max | n | goal / note |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        stats = row.stats
        notes = "; ".join(x for x in (row.goal, row.note) if x)
        lines.append(f"| {row.name} | {_cell(stats and stats.min)} | {_cell(stats and stats.median)} | "
                     f"{_cell(stats and stats.max)} | {stats.n if stats else 0} | {notes} |")
    return "\n".join(lines) + "\n"


def host_facts(accel: str, kernels: Mapping[str, str]) -> dict:
    """Cores, load, the accelerator the guests really used (with its reason), kernel releases."""
    return {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "machine": platform.machine(), "host_kernel": platform.release(),
            "python": platform.python_version(), "accelerator": accel, "kernels": dict(kernels)}


def write_json(path: Path, rows: Sequence[Row], host: Mapping, repeat: int) -> Path:
    """``results/bench.json``, written whole (temp file + rename).  The rows of an earlier
    run that this one did not measure (``--only``) are kept; a row measured again is
    replaced.  Each row says which run measured it (when, ``--repeat``, load, accelerator),
    since two ``--only`` runs may see different loads; ``host`` and ``repeat`` are the
    latest run's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run = {"at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "repeat": repeat,
           "load_average": list(host.get("load_average", ())), "accelerator": host.get("accelerator", "")}
    merged = {r["name"]: r for r in _earlier_rows(path)}
    merged.update({r.name: {**r.to_dict(), "run": run} for r in rows})
    data = {"repeat": repeat, "host": dict(host), "rows": list(merged.values())}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def _earlier_rows(path: Path) -> list[dict]:
    """The rows an earlier run left in ``path``; none if there is no file or it is not
    bench.json's shape (it is then replaced, not merged)."""
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)] \
        if isinstance(rows, list) else []


# --- what the measurements read -----------------------------------------------------

_RETEST = re.compile(r"^retest: (?P<mode>[a-z-]+) \((?P<why>.*)\)\s*$")


@dataclass(frozen=True)
class Retest:
    mode: str
    why: str


def parse_retest(output: str) -> Retest:
    """The ``retest: <module-reload|reboot|boot|unchanged> (<why>)`` line of `invoke retest`."""
    for line in output.splitlines():
        m = _RETEST.match(line.strip())
        if m and m["mode"] in RETEST_MODES:
            return Retest(m["mode"], m["why"])
    raise errors.BadArgument(what="`invoke retest` printed no `retest: MODE (WHY)` line",
                             fix="use an `invoke retest` that reports its path (module-reload, reboot, "
                                 "boot or unchanged)")


_STAMP = re.compile(r"^\[\s*(?P<t>\d+\.\d+)\] (?P<text>.*)$")
#: kernel console milestones (printk time): the root fs is mounted, init is started
KERNEL_MILESTONES = {"rootfs": re.compile(r"VFS: Mounted root"),
                     "init": re.compile(r"Run \S+ as init process")}


def kernel_milestones(lines: Iterable[str]) -> dict[str, float]:
    """``{"rootfs": 0.71, "init": 0.72}``: the kernel clock at each milestone on the console."""
    found: dict[str, float] = {}
    for line in lines:
        m = _STAMP.match(line.strip())
        if not m:
            continue
        for name, pattern in KERNEL_MILESTONES.items():
            if name not in found and pattern.search(m["text"]):
                found[name] = float(m["t"])
    return found


#: a scenario's guest commands by phase (the first word that decides, in order)
PHASES = (("mkfs", re.compile(r"\bmkfs\.")),
          ("dm-flakey", re.compile(r"\b(dmsetup|blockdev)\b")),
          ("mounts", re.compile(r"\b(u?mount|mountpoint|ovl-syscall mount|ovl-syscall umount)\b")),
          ("connect", re.compile(r"^connect$")))


def phase_of(command: str) -> str:
    """Which phase a guest command (as sent, see :func:`vm.machine.ssh.render`) belongs to."""
    body = re.sub(r"^OVH_CMD_TAG=\w+; export OVH_CMD_TAG; (exec )?", "", command)
    for name, pattern in PHASES:
        if pattern.search(body):
            return name
    return "other"


@dataclass
class Breakdown:
    """One scenario's SSH round trips: count and seconds per phase; ``boot``: the seconds
    of a guest boot in its setup (the session's first test boots the shared guest)."""

    seconds: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    boot: float = 0.0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.count[phase] = self.count.get(phase, 0) + 1

    @property
    def round_trips(self) -> int:
        return sum(n for p, n in self.count.items() if p not in ("connect", "reboot"))

    @property
    def ssh_seconds(self) -> float:
        return sum(s for p, s in self.seconds.items() if p not in ("connect", "reboot"))


def breakdowns(timing_lines: Iterable[str]) -> dict[str, Breakdown]:
    """The ``$OVH_SSH_TIMING`` file of a session, per test (``test_row[...]``), per phase.
    A boot in a test's setup (the shared guest) starts that test's breakdown afresh: the
    boot's own connects and ``true`` are not the scenario's; a boot during the test (a
    reboot row) is its phase ``reboot``."""
    per_test: dict[str, Breakdown] = {}
    for raw in timing_lines:
        if not raw.strip():
            continue
        entry = json.loads(raw)
        name, _, stage = entry.get("test", "").rpartition(" (")
        test = name.rpartition("::")[2] or "(no test)"
        if entry["what"] == "boot":
            if stage.startswith("setup"):
                per_test[test] = Breakdown(boot=entry["seconds"])
            else:
                per_test.setdefault(test, Breakdown()).add("reboot", entry["seconds"])
            continue
        per_test.setdefault(test, Breakdown()).add(phase_of(entry["what"]), entry["seconds"])
    return per_test


def case_times(junit_xml: Path) -> dict[str, float]:
    """``{"test_row[...]": seconds}`` of a pytest JUnit file (setup + call + teardown)."""
    import xml.etree.ElementTree as ET

    return {c.get("name", ""): float(c.get("time", "0") or 0)
            for c in ET.parse(junit_xml).getroot().iter("testcase")}


# --- the boots the harness is compared with -----------------------------------------

def bare_argv(arch: qemu.QemuArch, accel: qemu.Accel, kernel: Path, memory_mb: int, cpus: int) -> list[str]:
    """QEMU as the harness starts it, without any disk or network: the kernel boots to
    "VFS: Unable to mount root fs" and panics (``panic=-1`` + ``-no-reboot``: QEMU exits)."""
    return [arch.binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", arch.machine, *accel.qemu_args(arch, cpus), "-smp", str(cpus),
            "-m", str(memory_mb), "-kernel", str(kernel),
            "-append", f"console={arch.console},115200 panic=-1 loglevel=6", "-serial", "stdio"]


def vng_argv(vng: Path, kernel: Path, accel: qemu.Accel, memory_mb: int, cpus: int) -> list[str]:
    """``vng --run BZIMAGE --exec 'echo MARKER'``: virtme-ng boots the host's root
    filesystem with that kernel and runs one command (without KVM under TCG)."""
    # --verbose: the console on stdout.  Without udevd on the host (containers) virtme-ng-init
    # finds no /dev/virtio-ports/ links and runs the command on the console, which vng
    # otherwise sends to /dev/null: the command's output would never be seen.
    argv = [str(vng), "--run", str(kernel), "--cpus", str(cpus), "--memory", f"{memory_mb}M", "--verbose",
            "--exec", f"echo {VNG_MARKER}"]
    if accel.name != "kvm":
        argv.insert(3, "--disable-kvm")
    return argv
