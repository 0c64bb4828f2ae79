"""The shards cover exactly the tier `invoke ci` runs: no cell lost, none twice.

What `invoke ci` ran before it was data (unit, lint on every base, every
prefix and the debug kernel built, the scenarios on ovl.ci_variants limited by
ovl.ci_rows_for, the boot failures, tests/faults, tests/bisect) is written
out here from the settings, independently of vm/ci.py, and compared with the
union of the shards' cells; `invoke ci` itself is run with its phases
recorded instead of executed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from vm import ci, errors, pipeline
from vm.settings import Settings, load
from vm.suites.scenario import Expectations

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _settings(kind: str) -> Settings:
    s = load()
    if kind == "invoke.yaml":
        return s
    if kind == "other-base-first":      # the main base changes (as 6.12 -> 7.2 will) and a row limit is added
        return replace(s, base=s.bases[-1], bases=tuple(reversed(s.bases)),
                       ci_rows_for={**s.ci_rows_for, "baseline": ("fresh-volatile",)})
    if kind == "fewer-variants":
        return replace(s, ci_variants=("patched",), ci_rows_for={})
    raise AssertionError(kind)


SETTINGS = ["invoke.yaml", "other-base-first", "fewer-variants"]


def expected_cells(s: Settings, full: bool) -> list[str]:
    """What `invoke ci` runs, written from the settings the way it was before the plan existed."""
    table = Expectations.load(s.suite_path("expectations"))
    variants = s.ci_full_variants if full else s.ci_variants
    rows_for = s.ci_full_rows_for if full else s.ci_rows_for
    built = [v.label for v in pipeline.prefix_variants(s)] + ["patched-debug"]
    cells = ["unit:unit", *[f"lint:{b}" for b in s.bases], *[f"build:{s.base}/{v}" for v in built]]
    cells += [f"scenarios:{row}[{fs}-{v}]" for v in variants for row in (rows_for.get(v) or table.row_ids)
              for fs in table.filesystems]
    cells += [f"smoke:{v}" for v in variants] + ["fstests:" + s.base, "unionmount:" + s.base,
                                                   "boot_failures:boot_failures", "suite:faults",
                                                   "suite:bisect[slow and not roundtrip]"]
    if full:
        cells += ["mutation:" + s.base, *[f"fstests_full:{s.base}/{fs}" for fs in ("ext4", "xfs")], "boot_id:boot_id", "fstests_mutation:" + s.base,
                  "suite:bisect[roundtrip]"]
        for b in s.bases:
            if b != s.base:
                cells += [f"build:{b}/{v.label}" for v in pipeline.prefix_variants(s.with_base(b))]
            cells += [f"matrix:{row}[{fs}-{v}@{b}]" for v in ("baseline", "patched")
                      for row in table.row_ids for fs in table.filesystems]
    return cells


@pytest.mark.parametrize("full", [False, True], ids=["main", "full"])
@pytest.mark.parametrize("kind", SETTINGS, ids=SETTINGS)
def test_the_shards_cover_the_tier_exactly_once(kind, full):
    s = _settings(kind)
    covered = Counter(cell for sh in ci.shards(ci.plan(s, full)) for p in sh.phases for cell in ci.cells(s, p))
    twice = sorted(c for c, n in covered.items() if n > 1)
    assert twice == [], "run by more than one shard"
    expected = Counter(expected_cells(s, full))
    assert sorted(expected - covered) == [], "lost: `invoke ci` runs them, no shard does"
    assert sorted(covered - expected) == [], "a shard runs what `invoke ci` does not"


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Every phase run, in order, as (shard, title), the work itself replaced by a recorder."""
    ran: list[tuple[str, str]] = []
    monkeypatch.setattr(ci, "RUNNERS", {k: (lambda s, p: ran.append((p.shard, p.title)) or [])
                                        for k in ci.RUNNERS})
    monkeypatch.setattr(ci, "accel_used", lambda s, out: "tcg (test)")
    return ran


@pytest.mark.parametrize("full", [False, True], ids=["main", "full"])
def test_invoke_ci_runs_every_shard_and_the_shards_run_nothing_else(recorded, tmp_path, full):
    s = replace(load(), results_dir=tmp_path / "whole", ci_lanes=1)     # in-process: the recorder sees it
    phases = ci.plan(s, full)
    merged = ci.run_all(s, phases, full)
    whole = list(recorded)
    assert whole == [(p.shard, p.title) for p in phases]
    assert sorted(sh.name for sh in merged.shards) == sorted(sh.name for sh in ci.shards(phases))
    recorded.clear()
    one_by_one = replace(s, results_dir=tmp_path / "sharded")
    for sh in ci.shards(phases):
        ci.run_shard(one_by_one, ci.pick(phases, sh.name), phases, full)
    assert Counter(recorded) == Counter(whole)
    assert len(set(whole)) == len(whole)


def test_a_failing_phase_stops_invoke_ci_and_the_report_is_still_written(recorded, monkeypatch, tmp_path):
    s = replace(load(), results_dir=tmp_path, ci_lanes=1)

    def broken(settings, phase):
        raise errors.LintFailed(count=1, patches="0001-x.patch")

    monkeypatch.setitem(ci.RUNNERS, "lint", broken)
    with pytest.raises(errors.LintFailed):
        ci.run_all(s, ci.plan(s))
    assert recorded == [("unit", "unit tests")]
    manifest = json.loads((tmp_path / "shards" / f"lint-{s.bases[0]}" / ci.MANIFEST).read_text())
    assert manifest["status"] == "failed" and "checkpatch" in manifest["phases"][0]["message"]
    assert "failed" in (tmp_path / "summary.md").read_text()


def test_adding_a_phase_is_one_line(monkeypatch):
    s = load()
    base = ci._main_phases

    def with_new_suite(settings, full):
        return base(settings, full) + [ci.Phase("new-suite", "suite", "a new suite", suite="new")]

    monkeypatch.setattr(ci, "_main_phases", with_new_suite)
    assert ci.shards(ci.plan(s))[-1].name == "new-suite"
    assert "new-suite" in [row["shard"] for row in ci.shard_matrix(s)["include"]]


def test_unknown_shard_names_the_real_ones():
    s = load()
    with pytest.raises(errors.BadArgument, match="unknown shard 'nope'.*unit"):
        ci.pick(ci.plan(s), "nope")


def test_list_shards_prints_the_job_matrix():
    res = subprocess.run([sys.executable, "-m", "invoke", "ci", "--list-shards"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["include"]
    s = load()
    assert [r["shard"] for r in rows] == [sh.name for sh in ci.shards(ci.plan(s))]
    assert {r["plan"] for r in rows} == {ci.plan_id(ci.plan(s))} and {r["tier"] for r in rows} == {"main"}
    assert all(set(r) == {"shard", "base", "tier", "plan"} for r in rows)


def test_the_plan_id_changes_with_the_plan():
    s = load()
    assert ci.plan_id(ci.plan(s)) == ci.plan_id(ci.plan(load()))
    assert ci.plan_id(ci.plan(s)) != ci.plan_id(ci.plan(replace(s, ci_variants=("patched",))))
