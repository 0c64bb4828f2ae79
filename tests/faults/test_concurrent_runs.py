"""Two `invoke test` runs started together on the same kernels, image and cache both pass:
each boots its own guest in a run dir of its own (own scratch disks, console log, SSH
port), and each run's results and console log land in its own results dir."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import qemus_under, real_settings
from vm.machine import guest
from vm.suites import junit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.guest]

#: one scenario (the smoke and boot-failure tests are deselected by -k)
SCENARIO = "test_row and fresh-volatile-ext4"


def _new_run_dirs(root, since: float) -> list:
    """The patched run dirs made since ``since`` (their lock file is made with them)."""
    return sorted(d for d in root.iterdir()
                  if (m := guest.RUN_DIR_NAME.match(d.name)) and m["label"] == "patched"
                  and (d / "lock").is_file() and (d / "lock").stat().st_mtime >= since)


def test_two_test_runs_at_once_both_pass(harnesses, tmp_path):
    run_root = real_settings().sub("run")
    since = time.time() - 1
    runs = []
    for n in (1, 2):
        results = tmp_path / f"results{n}"
        runs.append((harnesses(["test", "--variants", "patched", "-k", SCENARIO], None,
                               tmp_path / f"run{n}.log", results=results), results))
    for run, _ in runs:
        run.check(900)
    for run, results in runs:
        cases = list(junit.cases(results / "scenarios.xml"))
        assert [c.outcome for c in cases] == ["passed"], run.output()[-3000:]
        assert "ovl-init" in (results / "console-patched.log").read_text(errors="replace")
    (a, _), (b, _) = runs
    assert max(a.started, b.started) < min(a.ended, b.ended), "the two runs did not overlap"
    # two guests in two run dirs, each with its own scratch disks; none left running
    fresh = _new_run_dirs(run_root, since)
    assert len(fresh) >= 2 and all((d / "scratch0.img").is_file() for d in fresh[:2]), fresh
    assert all(qemus_under(d) == [] for d in fresh)
    # and the two guests ran at the same time (made before the other's console went quiet)
    made = sorted((d / "lock").stat().st_mtime for d in fresh[-2:])
    quiet = sorted((d / "console.log").stat().st_mtime for d in fresh[-2:])
    assert made[1] < quiet[0], "the two guests did not overlap"
