"""fstests batch mode (vm/suites/fstests_batch.py) against a fake guest that plays back
saved real ``./check -overlay -R xunit`` output (tests/data/fstests/batch-*: check's
output and result.xml of `invoke fstests --variants baseline --fs xfs` with
ovl.fstests_ci_tests, base 7.2, batch mode; result.xml as the harness kept it): the
progress parser, per-test timeouts from each test's own start, a hang that reboots the
guest and resumes with the tests not run yet, kmsg splats per test, the merged
result.xml (fstests' <properties> once), and the mounts released between filesystems."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vm import errors
from vm.machine import console
from vm.machine.ssh import CommandResult
from vm.suites import fstests, fstests_batch
from vm.suites.fstests import FAILED, NOTRUN, PASSED

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "fstests"
REAL_OUT = (DATA / "batch-check.out").read_text()
REAL_XML = (DATA / "batch-result.xml").read_text()
REAL = {r.test: r for r in fstests.parse_xunit(REAL_XML)}
TESTS = list(REAL)


def split_output(text: str) -> tuple[str, dict[str, str], str]:
    """check's output as (header, {test: its lines}, footer)."""
    header, blocks, footer, current = [], {}, [], None
    for line in text.splitlines():
        first = line.split(" ", 1)[0]
        if first in REAL and not line.startswith(" "):
            current = first
            blocks[current] = [line]
        elif line.startswith(("Ran:", "Not run:", "Failures:", "Failed ", "Passed all")):
            current = None
            footer.append(line)
        elif current:
            blocks[current].append(line)
        else:
            header.append(line)
    return "\n".join(header), {t: "\n".join(b) for t, b in blocks.items()}, "\n".join(footer)


HEADER, BLOCKS, FOOTER = split_output(REAL_OUT)

WARNING = ["------------[ cut here ]------------",
           "WARNING: CPU: 0 PID: 812 at fs/overlayfs/super.c:1234 ovl_fill_super+0x99/0x100 [overlay]",
           "Call Trace:", " <TASK>", " </TASK>", "---[ end trace 0000000000000000 ]---"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeGuest:
    """A guest running ``./check`` detached: each test takes ``seconds[test]`` (None:
    hangs), check's output and result.xml grow as the real ones did."""

    SETUP = 3.0

    def __init__(self, clock: Clock, seconds: dict[str, float | None], splat_in: str | None = None,
                 failing: tuple[str, ...] = ()):
        self.clock, self.seconds, self.splat_in, self.failing = clock, seconds, splat_in, set(failing)
        self.boots, self.commands, self.dead = 1, [], False
        self.kmsg: list[str] = []
        self.launch: tuple[float, list[str]] | None = None
        self.hung_kmsg_read = False

    # timeline of the current ./check
    def _schedule(self) -> list[tuple[str, float, float]]:
        t0, tests = self.launch
        out, at = [], t0 + self.SETUP
        for test in tests:
            took = self.seconds.get(test, 1.0)
            end = float("inf") if took is None else at + took
            out.append((test, at, end))
            at = end
        return out

    def _state(self):
        sched = self._schedule()
        now = self.clock.now
        started = [t for t, s, _ in sched if s <= now]
        finished = [t for t, _, e in sched if e <= now]
        done = len(finished) == len(sched) and now >= sched[-1][2] + 1
        return started, finished, done

    def _output(self) -> tuple[str, str]:
        started, finished, done = self._state()
        lines = [HEADER] + [self._block(t) for t in finished]
        if len(started) > len(finished):
            lines.append(started[-1] + " ")
        if done:
            lines.append(FOOTER if finished == TESTS else "Ran: " + " ".join(finished))
        return "\n".join(lines), ("0" if done else "")

    def _block(self, test: str) -> str:
        if test in self.failing:      # check's format for a failure (check: _dump_err)
            return (f"{test} - output mismatch (see /var/tmp/fstests-results/xfs/{test}.out.bad)\n"
                    f"    --- tests/{test}.out\n    +++ /var/tmp/fstests-results/xfs/{test}.out.bad\n"
                    "    +mounted: a volatile workdir was reused after a writeback error")
        return BLOCKS.get(test, test + " - no such test?")

    def _report(self, finished: list[str]) -> str | None:
        if not finished and not self._state()[0]:
            return None
        root = ET.fromstring(REAL_XML)
        for case in root.findall("testcase"):
            if case.get("name") not in finished:
                root.remove(case)
            elif case.get("name") in self.failing:
                for child in list(case):
                    case.remove(child)
                ET.SubElement(case, "failure", message="- output mismatch", type="TestFail")
        return ET.tostring(root, encoding="unicode")

    def _dmesg(self) -> str:
        lines = ["[    0.000000] Linux version 7.2.13", *self.kmsg]
        if self.launch:
            for test in self._state()[0]:
                lines.append(f"[   12.000000] run fstests {test} at 2026-11-24 10:00:00")
                if test == self.splat_in:
                    lines += [f"[   12.500000] {w}" for w in WARNING]
        return "\n".join(lines) + "\n"

    def run(self, cmd, timeout=None, check=False):
        self.commands.append(cmd)
        if self.dead:
            raise errors.SSHUnreachable(host="127.0.0.1", port=2222, reason="timed out", fix="reboot")
        text = " ".join(cmd)
        out, status = "", 0
        if "setsid -f" in text:
            self.launch = (self.clock.now, list(cmd[4:]))
        elif "@@ovl-batch-rc" in text:
            output, rc = self._output()
            out = f"{output}\n\n@@ovl-batch-rc={rc}\n"
        elif "/dev/kmsg" in text:
            self.kmsg.append(f"[   11.000000] {cmd[-1]}")
        elif cmd == ["dmesg"]:
            out = self._dmesg()
        elif 'test -f "$1" && cat "$1"' in text:
            path = cmd[-1]
            started, finished, done = self._state() if self.launch else ([], [], False)
            if path.endswith("/result.xml"):
                report = self._report(finished)
                out, status = (report, 0) if report else ("", 1)
            elif path.endswith("/check.log"):
                out, status = (f"Ran: {' '.join(finished)}\n", 0) if done else ("", 1)
            elif path.endswith(".out.bad"):
                test = path.split("/xfs/", 1)[1][: -len(".out.bad")]
                failed = test in finished and test in self.failing
                out, status = ("+mounted: a volatile workdir was reused\n", 0) if failed else ("", 1)
            else:
                status = 1
        result = CommandResult(tuple(cmd), status, out, "")
        return result.check() if check else result

    def restart(self) -> None:
        self.boots += 1
        self.dead, self.launch, self.kmsg = False, None, []


def make_batch(tmp_path, guest: FakeGuest, clock: Clock, tests=TESTS, timeout=600.0, **kw):
    prepared = []
    batch = fstests_batch.Batch(guest, tests, "xfs", tmp_path / "patched-xfs", timeout=timeout,
                                prepare=lambda: prepared.append(guest.boots), restart=guest.restart,
                                console_tail=lambda: "[  700.1] INFO: task check:812 blocked for more than 120 seconds.",
                                find_splats=console.find_splats, poll=5.0, clock=clock, sleep=clock.sleep, echo=lambda line: None, **kw)
    return batch, prepared


# --- the parsers against real output ------------------------------------------------------

def test_started_tests_reads_check_output_in_order():
    assert fstests_batch.started_tests(REAL_OUT, TESTS) == TESTS
    partial = REAL_OUT[: REAL_OUT.index(TESTS[1])] + TESTS[1] + " "
    assert fstests_batch.started_tests(partial, TESTS) == TESTS[:2]
    # the summary and the diff lines of a failure name tests too, but are not a start
    assert fstests_batch.started_tests(FOOTER, TESTS) == []


def test_parse_poll_splits_output_and_exit_status():
    assert fstests_batch.parse_poll("overlay/010 \n\n@@ovl-batch-rc=\n") == ("overlay/010 ", None)
    assert fstests_batch.parse_poll(REAL_OUT + "\n@@ovl-batch-rc=1\n") == (REAL_OUT.rstrip("\n"), 1)


def test_start_argv_passes_every_test_to_a_detached_check():
    argv = fstests_batch.start_argv(2, ["overlay/010", "overlay/118"])
    outer = argv[2]
    assert "setsid -f" in outer and 'sh "$@"' in outer      # $0 of the inner sh is not a test
    assert argv[4:] == ["overlay/010", "overlay/118"]
    assert "./check -overlay -R xunit" in argv[3] and "/2.out" in argv[3] and "</dev/null" in argv[3]


def test_kmsg_slices_per_test_last_run_wins():
    lines = ["run fstests overlay/010 at 1", "a", "run fstests overlay/010 at 2", "b",
             "run fstests overlay/999 at 3", "c", "run fstests overlay/031 at 4", "d"]
    assert fstests_batch.kmsg_slices(lines, ["overlay/010", "overlay/031"]) == {
        "overlay/010": ["b"], "overlay/031": ["d"]}


# --- a batch on a fake guest -----------------------------------------------------------------

def test_batch_runs_every_test_in_one_check_with_real_verdicts(tmp_path):
    clock = Clock()
    guest = FakeGuest(clock, {t: REAL[t].seconds for t in TESTS})
    batch, prepared = make_batch(tmp_path, guest, clock)
    outcomes = batch.run()
    assert {t: o.result.outcome for t, o in outcomes.items()} == {t: r.outcome for t, r in REAL.items()}
    assert {PASSED, NOTRUN} <= {r.outcome for r in REAL.values()}     # the saved run has both
    assert batch.runs == 1 and prepared == [1]
    assert sum("setsid -f" in " ".join(c) for c in guest.commands) == 1
    notrun = [o.result for o in outcomes.values() if o.result.outcome == NOTRUN]
    assert all(r.message for r in notrun)                     # a notrun keeps fstests' reason
    out = tmp_path / "patched-xfs"
    assert (out / "check.log").read_text().startswith("Ran: ")
    assert TESTS[0] in (out / "check.out").read_text()


def test_a_failing_test_fails_with_its_files_kept_and_the_others_keep_theirs(tmp_path):
    clock = Clock()
    failing = TESTS[-1]
    guest = FakeGuest(clock, {}, failing=(failing,))
    batch, _ = make_batch(tmp_path, guest, clock)
    outcomes = batch.run()
    assert outcomes[failing].result.outcome == FAILED and "output mismatch" in outcomes[failing].result.message
    out = tmp_path / "patched-xfs"
    assert "volatile workdir was reused" in (out / f"{failing}.out.bad").read_text()
    assert [t for t in TESTS if (out / f"{t}.out.bad").is_file()] == [failing]
    for test in TESTS[:-1]:
        assert outcomes[test].result.outcome == REAL[test].outcome


def test_a_batch_starts_with_an_empty_results_dir(tmp_path):
    stale = tmp_path / "patched-xfs" / "overlay" / "010.out.bad"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier session")
    clock = Clock()
    batch, _ = make_batch(tmp_path, FakeGuest(clock, {}), clock)
    batch.run()
    assert not stale.exists()
    assert (tmp_path / "patched-xfs" / "check.out").read_text().count("=== ./check run") == 1


def test_result_xml_keeps_fstests_properties_once(tmp_path):
    clock = Clock()
    guest = FakeGuest(clock, {t: REAL[t].seconds for t in TESTS})
    batch, _ = make_batch(tmp_path, guest, clock)
    batch.run()
    text = (tmp_path / "patched-xfs" / "result.xml").read_text()
    assert text.count("<properties") == REAL_XML.count("<properties") == 1
    merged = {r.test: r.outcome for r in fstests.parse_xunit(text)}
    assert merged == {t: r.outcome for t, r in REAL.items()}


def test_timeout_runs_from_the_test_start_not_the_batch_start(tmp_path):
    """Every test takes 80% of the timeout: the batch takes far longer than the timeout,
    and still nothing counts as hung."""
    clock = Clock()
    guest = FakeGuest(clock, {t: 80.0 for t in TESTS})
    batch, _ = make_batch(tmp_path, guest, clock, timeout=100.0)
    outcomes = batch.run()
    assert batch.seconds > 100.0 * 2
    assert {t: o.result.outcome for t, o in outcomes.items()} == {t: r.outcome for t, r in REAL.items()}
    assert guest.boots == 1


def test_a_hung_test_reboots_the_guest_and_the_rest_runs_on_the_fresh_one(tmp_path):
    clock = Clock()
    hung = TESTS[1]
    guest = FakeGuest(clock, {hung: None})
    batch, prepared = make_batch(tmp_path, guest, clock, timeout=100.0)
    outcomes = batch.run()
    assert guest.boots == 2 and batch.runs == 2 and prepared == [1, 2]
    r = outcomes[hung].result
    assert r.outcome == FAILED and "100s after ./check started it" in r.message and "rebooted" in r.message
    assert "blocked for more than" in outcomes[hung].detail                      # the console tail
    assert 100.0 < r.seconds <= 100.0 + 2 * 5.0
    assert outcomes[TESTS[0]].result.outcome == REAL[TESTS[0]].outcome          # read before the hang
    launches = [c[4:] for c in guest.commands if "setsid -f" in " ".join(c)]
    assert launches == [TESTS, TESTS[2:]]                                         # resumed after it
    for test in TESTS[2:]:
        assert outcomes[test].result.outcome == REAL[test].outcome
    out = tmp_path / "patched-xfs"
    assert "blocked for more than" in (out / f"{hung}.console").read_text()
    text = (out / "result.xml").read_text()
    assert text.count("<properties") == 1
    assert {r.test: r.outcome for r in fstests.parse_xunit(text)}[hung] == FAILED


def test_a_guest_that_stops_answering_fails_the_current_test_after_its_timeout(tmp_path):
    clock = Clock()
    guest = FakeGuest(clock, {TESTS[0]: None})
    batch, _ = make_batch(tmp_path, guest, clock, timeout=60.0)
    real_run = guest.run

    def run(cmd, **kw):
        if guest.boots == 1 and guest.launch and clock.now > guest.launch[0] + 10:
            guest.dead = True               # the first boot stops answering for good
        return real_run(cmd, **kw)

    guest.run = run
    outcomes = batch.run()
    assert outcomes[TESTS[0]].result.outcome == FAILED and guest.boots == 2
    assert {t: o.result.outcome for t, o in outcomes.items() if t != TESTS[0]} == {
        t: r.outcome for t, r in REAL.items() if t != TESTS[0]}


def test_a_dead_qemu_is_a_hang_at_once(tmp_path):
    clock = Clock()
    guest = FakeGuest(clock, {TESTS[0]: None})
    batch, _ = make_batch(tmp_path, guest, clock, timeout=600.0, alive=lambda: not guest.dead)
    real_run = guest.run

    def run(cmd, **kw):
        if guest.boots == 1 and guest.launch and clock.now > guest.launch[0] + 10:
            guest.dead = True
        return real_run(cmd, **kw)

    guest.run = run
    outcomes = batch.run()
    assert "QEMU exited" in outcomes[TESTS[0]].result.message
    assert outcomes[TESTS[0]].result.seconds < 600.0


def test_check_that_never_starts_a_test_fails_the_first_one(tmp_path):
    clock = Clock()
    guest = FakeGuest(clock, {})
    guest.SETUP = 10_000.0
    batch, _ = make_batch(tmp_path, guest, clock, tests=TESTS[:1], timeout=50.0)
    guest_restart = guest.restart

    def restart():
        guest_restart()
        guest.SETUP = 3.0

    batch.restart = restart
    outcomes = batch.run()
    assert "did not start it within 50s" in outcomes[TESTS[0]].result.message


def test_a_splat_in_a_tests_kmsg_slice_fails_that_test_only(tmp_path):
    clock = Clock()
    passing = [t for t in TESTS if REAL[t].outcome == PASSED]
    guest = FakeGuest(clock, {}, splat_in=passing[0])
    batch, _ = make_batch(tmp_path, guest, clock)
    outcomes = batch.run()
    hit = outcomes[passing[0]]
    assert hit.result.outcome == FAILED and "WARNING" in hit.result.message and "fstests: passed" in hit.result.message
    assert "cut here" in hit.detail
    for test in TESTS:
        if test != passing[0]:
            assert outcomes[test].result.outcome == REAL[test].outcome, test
    xml = {r.test: r.outcome for r in fstests.parse_xunit((tmp_path / "patched-xfs" / "result.xml").read_text())}
    assert xml[passing[0]] == FAILED


def test_a_splat_before_any_test_marker_of_this_run_is_not_blamed_on_a_test(tmp_path):
    clock = Clock()
    guest = FakeGuest(clock, {})
    guest.kmsg = [f"[    5.000000] {w}" for w in WARNING]     # an earlier fs's, before this run's mark
    batch, _ = make_batch(tmp_path, guest, clock)
    outcomes = batch.run()
    assert {t: o.result.outcome for t, o in outcomes.items()} == {t: r.outcome for t, r in REAL.items()}


def test_a_test_without_a_verdict_in_result_xml_fails(tmp_path):
    clock = Clock()
    guest = FakeGuest(clock, {})
    batch, _ = make_batch(tmp_path, guest, clock, tests=TESTS + ["overlay/999"])
    outcomes = batch.run()
    assert outcomes["overlay/999"].result.outcome == FAILED
    assert "no verdict" in outcomes["overlay/999"].result.message


# --- between filesystems -----------------------------------------------------------------

class MountsGuest:
    def __init__(self, mounts: list[str], stuck: set[str] = frozenset()):
        self.mounts, self.stuck, self.commands = list(mounts), set(stuck), []

    def run(self, cmd, timeout=None, check=False):
        self.commands.append(list(cmd))
        status, out = 0, ""
        if cmd == ["cat", "/proc/mounts"]:
            out = "".join(f"dev {m} fs rw 0 0\n" for m in self.mounts)
        elif cmd[0] == "umount":
            if cmd[1] in self.stuck or cmd[1] not in self.mounts:
                status = 32
            else:
                idx = len(self.mounts) - 1 - self.mounts[::-1].index(cmd[1])
                under = [m for m in self.mounts[idx + 1:] if m.startswith(cmd[1] + "/")]
                status = 32 if under else 0
                if not under:
                    del self.mounts[idx]
        result = CommandResult(tuple(cmd), status, out, "")
        return result.check() if check else result


def test_release_mounts_kills_users_and_unmounts_overlays_first():
    g = MountsGuest(["/", "/var/lib/xfstests", "/mnt/test", "/mnt/scratch", "/mnt/test/ovl-mnt",
                     "/mnt/scratch/ovl-mnt", "/mnt/scratch/ovl-mnt"])
    fstests.release_mounts(g, "ext4")
    assert g.mounts == ["/", "/var/lib/xfstests"]
    umounts = [c[1] for c in g.commands if c[0] == "umount"]
    assert umounts.index("/mnt/scratch/ovl-mnt") < umounts.index("/mnt/scratch")
    fusers = [c for c in g.commands if c[0] == "fuser"]
    assert fusers and all(c[:2] == ["fuser", "-km"] and c[2].startswith(("/mnt/test", "/mnt/scratch"))
                          for c in fusers)                  # never fuser -km on / (kills sshd)


def test_release_mounts_fails_when_a_mount_stays():
    g = MountsGuest(["/", "/mnt/scratch"], stuck={"/mnt/scratch"})
    with pytest.raises(errors.FstestsMountsBusy, match="/mnt/scratch still mounted.*ext4"):
        fstests.release_mounts(g, "ext4")


def test_release_mounts_with_nothing_mounted_does_nothing():
    g = MountsGuest(["/", "/mnt"])
    fstests.release_mounts(g, "xfs")
    assert [c[0] for c in g.commands] == ["cat", "cat"]


def test_write_result_xml_marks_harness_verdicts(tmp_path):
    hung = fstests_batch.Outcome(fstests.TestResult("overlay/031", FAILED, "no verdict; guest killed", 601))
    path = tmp_path / "result.xml"
    fstests_batch.write_result_xml(path, [REAL_XML, "<not xml"], {"overlay/031": hung}, TESTS)
    merged = {r.test: r for r in fstests.parse_xunit(path.read_text())}
    assert merged["overlay/031"].outcome == FAILED and "guest killed" in merged["overlay/031"].message
    assert 'failures="' in path.read_text() and path.read_text().count("<properties") == 1


def test_write_result_xml_keeps_fstests_file_as_it_is_when_nothing_changed(tmp_path):
    path = tmp_path / "result.xml"
    same = {t: fstests_batch.Outcome(r) for t, r in REAL.items()}
    fstests_batch.write_result_xml(path, [REAL_XML], same, TESTS)
    assert path.read_text() == REAL_XML
    splat = dict(same, **{TESTS[0]: fstests_batch.Outcome(fstests.TestResult(TESTS[0], FAILED, "kernel reported BUG"))})
    fstests_batch.write_result_xml(path, [REAL_XML], splat, TESTS)
    assert path.read_text() != REAL_XML and path.read_text().count("<properties") == 1
