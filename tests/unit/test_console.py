"""Console parsing against saved guest logs, and the follow() generator."""

import threading
import time
from pathlib import Path

import pytest

from vm import errors
from vm.machine import console

pytestmark = pytest.mark.unit
LOGS = Path(__file__).resolve().parents[1] / "data" / "console"


def events(name: str) -> list[console.Event]:
    lines = (LOGS / name).read_text(errors="replace").splitlines()
    return [e for e in map(console.classify, lines) if e is not console.Event.NONE]


def test_saved_boot_log_reaches_ready():
    evs = events("boot-ok.log")
    assert evs[0] is console.Event.KERNEL_START
    assert evs[-1] is console.Event.READY
    assert console.Event.PANIC not in evs


def test_saved_boot_log_has_no_splat():
    assert console.find_splats((LOGS / "boot-ok.log").read_text().splitlines()) == []


def test_saved_panic_log_is_a_panic():
    evs = events("panic-no-root.log")
    assert console.Event.PANIC in evs and console.Event.READY not in evs


def test_saved_crash_log_reports_oops_once():
    splats = console.find_splats((LOGS / "sysrq-crash.log").read_text().splitlines())
    kinds = [s.kind for s in splats]
    assert kinds and kinds[0] in ("Oops", "BUG", "panic")
    assert len(splats) <= 3, "one report is one splat, not one per line"


@pytest.mark.parametrize("line,kind", [
    ("[   12.1] WARNING: CPU: 0 PID: 1 at fs/overlayfs/super.c:100 ovl_fill_super+0x1/0x2", "WARNING"),
    ("[    3.0] BUG: KASAN: slab-use-after-free in ovl_check_incompat+0x5/0x9", "BUG"),
    ("[    4.0] WARNING: possible circular locking dependency detected", "WARNING"),
    ("[    5.0] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580", "BUG"),
    ("[    6.0] Oops: general protection fault, probably for non-canonical address", "Oops"),
], ids=["warn-on", "kasan", "lockdep", "atomic-sleep", "gpf"])
def test_splat_kinds(line, kind):
    (splat,) = console.find_splats(["[    1.0] ok", line, "[    7.0] more"])
    assert splat.kind == kind


def test_ordinary_overlay_errors_are_not_splats():
    lines = ["[   9.0] overlay: overlay with incompat feature 'volatile' cannot be mounted",
             "[   9.1] overlay: Cannot mount volatile when upperdir has an unseen error. Sync upperdir fs to clear state."]
    assert console.find_splats(lines) == []


def test_follow_yields_appended_lines_and_stops_when_dead(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("first\nsec")
    alive = [True]

    def writer():
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write("ond\r\nthird\n")
        time.sleep(0.3)
        alive[0] = False

    threading.Thread(target=writer).start()
    got, teed = [], []
    for line in console.follow(log, deadline=time.monotonic() + 5, alive=lambda: alive[0],
                               sink=teed.append, poll=0.05):
        got.append(line)
    assert got == ["first", "second", "third"] and teed == got


def test_follow_enforces_deadline(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("")
    start = time.monotonic()
    with pytest.raises(errors.ConsoleTimeout):
        for _ in console.follow(log, deadline=time.monotonic() + 0.3, poll=0.05):
            pass
    assert time.monotonic() - start < 2
