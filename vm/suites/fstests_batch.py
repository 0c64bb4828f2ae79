"""fstests in batch mode: one background ``./check -overlay -R xunit <tests...>`` per
(kernel, base fs), polled over SSH.

``./check`` pays its start-up (config, mounts, checks of the base fs) once per run
instead of once per test.  It runs detached in the guest (``setsid -f``, output to a
file), and :class:`Batch` polls that file: a test has *started* when check printed its
name, so each test's timeout runs from its own start, not from the batch's.  A test
past the timeout gets the guest killed and booted again (``restart``), is failed with
the console tail, and the tests check had not started yet run in a new ``./check`` on
the fresh guest.  A kernel splat in the kmsg slice of a test (check writes ``run fstests
<test> at ...`` to ``/dev/kmsg`` before each one) fails that test.

Results, in ``out_dir``: ``result.xml`` (fstests' own, one ``<properties>``; the cases of
later runs and the harness' verdicts merged in), ``check.log``, ``check.out`` (check's
output) and each failing test's ``.out.bad``, ``.full`` and ``.dmesg``.

The guest is anything with ``run(cmd, timeout=...)``; the clock and sleep are injected,
so the unit tests drive it with a fake guest and saved real check output.
"""

from __future__ import annotations

import re
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from vm import errors, runner
from vm.suites import fstests
from vm.suites.fstests import FAILED, NOTRUN, PASSED, Runs, TestResult

#: where the guest keeps each run's output and exit status
BATCH_DIR = "/var/tmp/ovl-fstests-batch"
#: what check writes to /dev/kmsg before each test (check: "run fstests $seqnum at ...")
KMSG_MARKER = re.compile(r"run fstests (\S+) at ")
_TEST_LINE = re.compile(r"^(\S+/\d+)(?=\s|$)")
_RC_LINE = re.compile(r"^@@ovl-batch-rc=(-?\d*)$", re.M)


# --- pure helpers ---------------------------------------------------------------------

def start_argv(run: int, tests: Iterable[str]) -> list[str]:
    """Start ``./check -overlay -R xunit <tests>`` detached (its own session, no tty, no
    SSH channel held): output to ``<run>.out``, exit status to ``<run>.rc`` at the end."""
    script = (f'cd {fstests.FSTESTS_DIR} || exit 1\n'
              f'exec </dev/null >{BATCH_DIR}/{run}.out 2>&1\n'
              './check -overlay -R xunit "$@"\n'
              f'echo $? > {BATCH_DIR}/{run}.rc.tmp && mv {BATCH_DIR}/{run}.rc.tmp {BATCH_DIR}/{run}.rc\n')
    return ["sh", "-c", f'mkdir -p {BATCH_DIR} && rm -f {BATCH_DIR}/{run}.* && exec setsid -f sh -c "$0" sh "$@"',
            script, *tests]


def poll_argv(run: int) -> list[str]:
    """check's output so far, then ``@@ovl-batch-rc=<status>`` (empty while it runs)."""
    return ["sh", "-c", f'cat {BATCH_DIR}/{run}.out 2>/dev/null; echo; '
                        f'echo "@@ovl-batch-rc=$(cat {BATCH_DIR}/{run}.rc 2>/dev/null)"']


def parse_poll(text: str) -> tuple[str, int | None]:
    """(check's output, its exit status or None while it runs) from :func:`poll_argv`."""
    found = list(_RC_LINE.finditer(text))
    if not found:
        return text, None
    last = found[-1]
    rc = last.group(1)
    return text[:last.start()].rstrip("\n"), (int(rc) if rc else None)


def started_tests(output: str, tests: Iterable[str]) -> list[str]:
    """The tests of ``tests`` that check has started, in order: check prints a test's
    name at the start of a line when it starts it (``overlay/010 ...``)."""
    wanted, seen = set(tests), []
    for line in output.splitlines():
        m = _TEST_LINE.match(line)
        if m and m.group(1) in wanted and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def kmsg_slices(lines: Iterable[str], tests: Iterable[str]) -> dict[str, list[str]]:
    """Each test's kernel log: from check's ``run fstests <test> at`` line (its last
    one) to the next such line.  A test without a marker gets no slice."""
    wanted, slices = set(tests), {}
    current: str | None = None
    for line in lines:
        m = KMSG_MARKER.search(line)
        if m:
            current = m.group(1) if m.group(1) in wanted else None
            if current:
                slices[current] = []
            continue
        if current:
            slices[current].append(line)
    return slices


@dataclass(frozen=True)
class Outcome:
    """One test's verdict from a batch, with what a reader needs to see why."""

    result: TestResult
    detail: str = ""              # a splat's context, the console tail of a hang
    splats: tuple[str, ...] = ()  # one line each


def with_splats(outcome: Outcome, splats: list[Any]) -> Outcome:
    """A kernel splat (:class:`vm.machine.console.Splat`: ``str()`` and ``context``) fails
    the test whatever fstests said."""
    if not splats:
        return outcome
    names = ", ".join(str(s) for s in splats)
    r = outcome.result
    message = f"kernel reported {names}" + (f"; fstests: {r.message}" if r.outcome == FAILED and r.message
                                            else f" (fstests: {r.outcome})")
    context = "\n".join("\n".join(s.context) for s in splats)
    return Outcome(replace(r, outcome=FAILED, message=message),
                   (context + ("\n" + outcome.detail if outcome.detail else "")).strip(),
                   tuple(str(s) for s in splats))


def write_result_xml(path: Path, reports: list[str], outcomes: dict[str, Outcome],
                     order: Iterable[str]) -> None:
    """``path``: fstests' ``result.xml`` of the first run (its ``<properties>`` once), the
    testcases of every run in test order, and the harness' verdicts where they differ
    from fstests' (a hang, no verdict, a splat) as ``<failure>``.  One run whose verdicts
    the harness kept as they are is fstests' file, byte for byte."""
    order = list(order)
    if len(reports) == 1 and _as_reported(reports[0], outcomes, order):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reports[0])
        return
    root = None
    cases: dict[str, ET.Element] = {}
    for text in reports:
        try:
            tree = ET.fromstring(text)
        except ET.ParseError:
            continue
        if root is None:
            root = tree
        for case in tree.iter("testcase"):
            cases[case.get("name", "")] = case
    if root is None:
        root = ET.Element("testsuite", name="xfstests")
    for old in root.findall("testcase"):
        root.remove(old)
    for test in order:
        outcome = outcomes.get(test)
        case = cases.get(test)
        if case is None:
            if outcome is None:
                continue
            case = ET.Element("testcase", classname="xfstests.global", name=test,
                              time=f"{outcome.result.seconds:.0f}")
        if outcome is not None and outcome.result.outcome == FAILED and case.find("failure") is None:
            for skipped in case.findall("skipped"):
                case.remove(skipped)
            failure = ET.Element("failure", message=outcome.result.message, type="TestFail")
            case.insert(0, failure)
        root.append(case)
    counted = root.findall("testcase")
    root.set("tests", str(len(counted)))
    root.set("failures", str(sum(c.find("failure") is not None for c in counted)))
    root.set("skipped", str(sum(c.find("skipped") is not None for c in counted)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ET.ElementTree(root).write(tmp, encoding="unicode", xml_declaration=True)
    tmp.replace(path)


def _as_reported(report: str, outcomes: dict[str, Outcome], order: list[str]) -> bool:
    try:
        found = {r.test: r for r in fstests.parse_xunit(report)}
    except ET.ParseError:
        return False
    return (sorted(found) == sorted(order)
            and all(t in outcomes and outcomes[t].result == found[t] for t in order))


# --- the batch -------------------------------------------------------------------------

@dataclass
class _Run:
    """One ``./check`` process (a batch has more than one after a hang)."""

    number: int
    tests: list[str]
    output: str = ""
    started: list[str] = field(default_factory=list)
    current_since: float = 0.0
    report: str = ""                                  # the last result.xml read
    judged: set[str] = field(default_factory=set)     # kmsg slices read
    kept: set[str] = field(default_factory=set)       # failing tests' files copied


class Batch:
    """The tests of one (kernel, base fs) in as few ``./check`` runs as hangs allow.

    ``prepare()`` readies the guest for the fs (called before each run: a restarted
    guest needs it again), ``restart()`` kills and boots the guest, ``console_tail()``
    is the end of its console log, ``alive()`` says whether QEMU still runs and
    ``find_splats(lines)`` is the scenarios' splat finder (:func:`vm.machine.console.find_splats`)."""

    def __init__(self, guest: Runs, tests: Iterable[str], fs: str, out_dir: Path, *, timeout: float,
                 prepare: Callable[[], None], restart: Callable[[], None],
                 console_tail: Callable[[], str], find_splats: Callable[[list[str]], list[Any]],
                 alive: Callable[[], bool] = lambda: True,
                 poll: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, echo: Callable[[str], None] = runner.echo):
        self.guest, self.tests, self.fs, self.out_dir = guest, list(dict.fromkeys(tests)), fs, out_dir
        self.timeout, self.poll = timeout, poll
        self.prepare, self.restart, self.console_tail, self.alive = prepare, restart, console_tail, alive
        self.clock, self.sleep, self._echo = clock, sleep, echo
        self.outcomes: dict[str, Outcome] = {}
        self.find_splats = find_splats
        self.splats: dict[str, list[Any]] = {}
        self.reports: list[str] = []
        self.runs = 0
        self.seconds = 0.0
        self.mark = ""

    def echo(self, line: str) -> None:
        """Progress, also to ``out_dir/batch.log`` with the time (pytest captures stdout)."""
        self._echo(line)
        with open(self.out_dir / "batch.log", "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line.strip()}\n")

    @property
    def result_base(self) -> str:
        return f"{fstests.RESULT_BASE}/{self.fs}"

    def run(self) -> dict[str, Outcome]:
        """Run every test; ``out_dir`` starts empty (no file of an earlier session stays)."""
        begin = self.clock()
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.out_dir.mkdir(parents=True)
        while True:
            remaining = [t for t in self.tests if t not in self.outcomes]
            if not remaining:
                break
            self.runs += 1
            self.prepare()
            self._one_run(_Run(self.runs, remaining))
        write_result_xml(self.out_dir / "result.xml", self.reports, self.outcomes, self.tests)
        self.seconds = self.clock() - begin
        self.echo(f"  fstests batch {self.fs}: {len(self.tests)} test(s) in {self.seconds:.0f}s, "
                  f"{self.runs} ./check run(s): {counts(self.outcomes.values())}")
        return self.outcomes

    # -- one ./check ----------------------------------------------------------------

    def _one_run(self, run: _Run) -> None:
        g = self.guest
        g.run(["sh", "-c", 'rm -rf "$1" && mkdir -p "$1"', "sh", self.result_base], check=True)
        self.mark = f"ovl-harness-batch {self.fs} run {run.number} {time.time():.0f}"
        g.run(["sh", "-c", 'echo "$1" > /dev/kmsg', "sh", self.mark], check=True)
        self.echo(f"  fstests batch {self.fs} run {run.number}: {len(run.tests)} test(s), "
                  f"timeout {self.timeout:.0f}s per test")
        g.run(start_argv(run.number, run.tests), timeout=60, check=True)
        launched = run.current_since = self.clock()
        try:
            while True:
                self.sleep(self.poll)
                polled = self._poll(run)
                if polled is not None:
                    run.output, rc = polled
                    started = started_tests(run.output, run.tests)
                    if started != run.started:
                        self._progress(run, started)
                    if rc is not None:
                        self.echo(f"  ./check run {run.number} exited {rc}")
                        self._finish(run, rc)
                        return
                elif not self.alive():
                    self._hung(run, "the guest died (QEMU exited)")
                    return
                if self.clock() - (run.current_since if run.started else launched) > self.timeout:
                    self._hung(run, f"no verdict {self.timeout:.0f}s after ./check started it" if run.started
                               else f"./check did not start it within {self.timeout:.0f}s")
                    return
        finally:
            if run.report:
                self.reports.append(run.report)
            with open(self.out_dir / "check.out", "a") as fh:
                fh.write(f"=== ./check run {run.number} on {self.fs}: {' '.join(run.tests)}\n"
                         f"{run.output.rstrip()}\n")

    def _poll(self, run: _Run) -> tuple[str, int | None] | None:
        try:
            res = self.guest.run(poll_argv(run.number), timeout=60)
        except (errors.GuestCommandTimeout, errors.SSHUnreachable):
            return None
        return parse_poll(res.stdout) if res.exit_status == 0 else None

    def _verdicts(self, run: _Run) -> dict[str, TestResult]:
        return {r.test: r for r in fstests.parse_xunit(run.report)} if run.report else {}

    def _progress(self, run: _Run, started: list[str]) -> None:
        """check started another test: the ones before it are done.  Read their verdicts
        (check rewrites result.xml before it starts a test), kmsg slices and failing
        tests' files now: if a later test hangs the guest, they are gone."""
        run.started, run.current_since = started, self.clock()
        self.echo(f"    [{len(self.outcomes) + len(started)}/{len(self.tests)}] {started[-1]}")
        run.report = self._text(f"{self.result_base}/result.xml") or run.report
        done = started[:-1]
        self._read_splats(run, done)
        self._keep_files(run, [t for t, r in self._verdicts(run).items() if t in done and r.outcome == FAILED])

    def _finish(self, run: _Run, rc: int) -> None:
        run.report = self._text(f"{self.result_base}/result.xml") or run.report
        found = self._verdicts(run)
        for test in run.tests:
            self.outcomes[test] = Outcome(found.get(test) or TestResult(
                test, FAILED, f"./check (exit {rc}) left no verdict for it in result.xml: "
                              + runner.tail(run.output, 3).replace("\n", " | ")))
        self._read_splats(run, run.tests)
        self._apply_splats()
        self._keep_files(run, [t for t in run.tests if self.outcomes[t].result.outcome == FAILED])
        with open(self.out_dir / "check.log", "a") as fh:
            fh.write(self._text(f"{self.result_base}/check.log") or "")

    def _hung(self, run: _Run, what: str) -> None:
        """The current test (the first one if check started none) hung: keep what is
        known without asking the guest, kill it, boot it again; the tests check had not
        started run in the next ./check."""
        current = run.started[-1] if run.started else run.tests[0]
        found = self._verdicts(run)
        for test in run.started[:-1]:
            self.outcomes[test] = Outcome(found.get(test) or TestResult(
                test, FAILED, "finished before a later test hung, but its verdict was never read"))
        tail = self.console_tail()
        self.outcomes[current] = Outcome(TestResult(current, FAILED, f"{what}; guest killed and rebooted",
                                                    self.clock() - run.current_since), tail)
        self._apply_splats()
        console_file = self.out_dir / f"{current}.console"
        console_file.parent.mkdir(parents=True, exist_ok=True)
        console_file.write_text(tail + "\n")
        run.output += f"\n=== {current}: {what}; guest killed and rebooted\n"
        self.echo(f"    {current}: {what}; restarting the guest "
                  f"({sum(t not in self.outcomes for t in self.tests)} test(s) left)")
        self.restart()

    # -- what a run leaves ------------------------------------------------------------

    def _read_splats(self, run: _Run, finished: list[str]) -> None:
        todo = [t for t in finished if t not in run.judged]
        if not todo:
            return
        try:
            lines = self.guest.run(["dmesg"], check=True, timeout=60).stdout.splitlines()
        except errors.HarnessError:
            return          # read again with the next test (or lost with the guest: the hang is the verdict)
        for i in range(len(lines) - 1, -1, -1):
            if self.mark in lines[i]:
                lines = lines[i + 1:]
                break
        slices = kmsg_slices(lines, todo)
        for test in todo:
            run.judged.add(test)
            found = self.find_splats(slices.get(test, []))
            if found:
                self.splats[test] = found

    def _apply_splats(self) -> None:
        for test, found in self.splats.items():
            if test in self.outcomes and not self.outcomes[test].splats:
                self.outcomes[test] = with_splats(self.outcomes[test], found)

    def _keep_files(self, run: _Run, failed: list[str]) -> None:
        for test in failed:
            if test in run.kept:
                continue
            run.kept.add(test)
            for suffix in (".out.bad", ".full", ".dmesg"):
                text = self._text(f"{self.result_base}/{test}{suffix}")
                if text is not None:
                    target = self.out_dir / f"{test}{suffix}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text)

    def _text(self, path: str) -> str | None:
        try:
            res = self.guest.run(["sh", "-c", 'test -f "$1" && cat "$1"', "sh", path], timeout=60)
        except (errors.GuestCommandTimeout, errors.SSHUnreachable):
            return None
        return res.stdout if res.exit_status == 0 else None


def counts(outcomes: Iterable[Outcome]) -> dict[str, int]:
    tally = {PASSED: 0, NOTRUN: 0, FAILED: 0}
    for o in outcomes:
        tally[o.result.outcome] += 1
    return tally
