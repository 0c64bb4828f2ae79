"""`invoke report --merge` on the results of two real shards.

tests/data/shards/ holds what `invoke ci --shard scenarios-prefix-3` and
`invoke ci --shard scenarios-patched-debug` wrote, run one after the other on
this project's machine (manifest, JUnit, matrix.json; console logs left out),
and ci-matrix.json, the matrix of one whole `invoke ci` run of the same
commit.  Their manifests name every shard of that run's plan, so merging the
two alone is a merge with shards missing; the complete merges below rewrite
the plan to these two shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vm import errors
from vm.suites import merge
from vm.suites.report import Matrix

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "shards"
NAMES = ("scenarios-prefix-3", "scenarios-patched-debug")


def _manifest(d: Path) -> dict:
    return json.loads((d / merge.MANIFEST).read_text())


def _set_manifest(d: Path, **changes) -> None:
    (d / merge.MANIFEST).write_text(json.dumps({**_manifest(d), **changes}))


@pytest.fixture
def real(tmp_path) -> list[Path]:
    """The two saved shards, copied (as saved: their plan has every shard of the tier)."""
    out = []
    for name in NAMES:
        shutil.copytree(DATA / name, tmp_path / "in" / name)
        out.append(tmp_path / "in" / name)
    return out


@pytest.fixture
def two(real) -> list[Path]:
    """The same two shards as the whole plan (what a tier of two scenario shards would leave)."""
    for d in real:
        _set_manifest(d, shards=list(NAMES))
    return real


def _cells(d: Path) -> dict:
    return Matrix.from_dict(json.loads((d / "matrix.json").read_text())).status_cells()


def _cases(path: Path) -> list[str]:
    return [f"{c.get('classname')}::{c.get('name')}" for c in ET.parse(path).getroot().iter("testcase")]


def test_the_saved_shards_are_real_results():
    for name in NAMES:
        m = _manifest(DATA / name)
        assert m["shard"] == name and m["status"] == "passed" and m["junit"] == ["scenarios.xml"]
        assert len(m["shards"]) > len(NAMES) and m["accel"]
        assert _cells(DATA / name) and _cases(DATA / name / "scenarios.xml")
    assert _manifest(DATA / NAMES[0])["plan"] == _manifest(DATA / NAMES[1])["plan"]


def test_two_real_shards_merge_into_one_matrix_and_one_junit(two, tmp_path):
    m = merge.merge(two, tmp_path / "out")
    matrix = json.loads((tmp_path / "out" / "matrix.json").read_text())
    merged = Matrix.from_dict(matrix)
    assert merged.status_cells() == {**_cells(two[0]), **_cells(two[1])}
    assert len(merged.status_cells()) == len(_cells(two[0])) + len(_cells(two[1]))
    assert {v for _, _, v in merged.status_cells()} == {"prefix-3", "patched-debug"}
    assert set(merged.accel) == {"prefix-3", "patched-debug"}
    cases = _cases(tmp_path / "out" / merge.JUNIT)
    assert sorted(c for c in cases if not c.startswith("ci.")) == sorted(
        _cases(two[0] / "scenarios.xml") + _cases(two[1] / "scenarios.xml"))
    assert len([c for c in cases if c.startswith("ci.")]) == 2        # one case per phase
    md = (tmp_path / "out" / "matrix.md").read_text()
    assert "prefix-3 ext4" in md and "patched-debug xfs" in md and "Accelerator:" in md
    assert (tmp_path / "out" / "matrix.html").read_text().startswith("<!DOCTYPE html>")
    summary = (tmp_path / "out" / merge.SUMMARY).read_text()
    assert all(f"| {n} |" in summary for n in NAMES) and "JUnit:" in summary
    assert not m.conflicts and not m.missing


def test_two_shards_merged_give_the_matrix_of_one_invoke_ci_run(two, tmp_path):
    """The cells of the two shards, run one after the other and merged, are the cells of
    the same variants in one whole `invoke ci` run: same outcome, same actual result."""
    merged = merge.merge(two, tmp_path / "out").matrices[""]
    whole = Matrix.from_dict(json.loads((DATA / "ci-matrix.json").read_text()))
    mine = {v for _, _, v in merged.status_cells()}
    assert merged.status_cells() == {k: v for k, v in whole.status_cells().items() if k[2] in mine}
    assert merged.rows == [r for r in whole.rows if any(k[0] == r and k[2] in mine for k in whole.status_cells())]


def test_a_missing_shard_fails_the_merge_after_writing_the_report(real, tmp_path):
    with pytest.raises(errors.ShardsMissing) as exc:
        merge.merge(real, tmp_path / "out")
    others = [n for n in _manifest(real[0])["shards"] if n not in NAMES]
    assert f"shard(s) {', '.join(others)} of plan" in str(exc.value) and "fix:" in str(exc.value)
    assert (tmp_path / "out" / "matrix.md").is_file()
    assert "**missing**" in (tmp_path / "out" / merge.SUMMARY).read_text()


def test_one_of_two_missing(two, tmp_path):
    with pytest.raises(errors.ShardsMissing, match=f"shard\\(s\\) {NAMES[1]} of plan"):
        merge.merge(two[:1], tmp_path / "out")


def test_an_unfinished_shard_fails_the_merge(two, tmp_path):
    _set_manifest(two[1], status="running")
    with pytest.raises(errors.ShardsMissing, match=f"{NAMES[1]} did not finish"):
        merge.merge(two, tmp_path / "out")


def _flip_one_cell(src: Path, dest: Path) -> str:
    """A copy of ``src`` in which one passed scenario failed; returns its label."""
    shutil.copytree(src, dest)
    data = json.loads((dest / "matrix.json").read_text())
    case = data["cases"][0]
    case["status"], case["actual"] = "fail", "EIO"
    (dest / "matrix.json").write_text(json.dumps(data))
    tree = ET.parse(dest / "scenarios.xml")
    node = next(n for n in tree.getroot().iter("testcase") if case["nodeid"].endswith(n.get("name")))
    ET.SubElement(node, "failure", message="returned EIO")
    tree.write(dest / "scenarios.xml")
    return f"{case['row']}[{case['fs']}-{case['variant']}]"


def test_a_cell_run_twice_with_different_outcomes_fails_the_merge(two, tmp_path):
    label = _flip_one_cell(two[0], tmp_path / "rerun")
    with pytest.raises(errors.CellConflict) as exc:
        merge.merge([*two, tmp_path / "rerun"], tmp_path / "out")
    assert label in str(exc.value) and "(✓" in str(exc.value)       # the matrix cell
    assert "scenarios.xml:" in str(exc.value) and "(passed and failed)" in str(exc.value)   # its JUnit case
    assert "## Conflicts" in (tmp_path / "out" / merge.SUMMARY).read_text()


def test_a_cell_run_twice_with_the_same_outcome_is_counted_once(two, tmp_path):
    shutil.copytree(two[0], tmp_path / "again")
    m = merge.merge([*two, tmp_path / "again"], tmp_path / "out")
    assert len(m.matrices[""].status_cells()) == len(_cells(two[0])) + len(_cells(two[1]))
    assert len(_cases(tmp_path / "out" / merge.JUNIT)) == (
        len(_cases(two[0] / "scenarios.xml")) + len(_cases(two[1] / "scenarios.xml")) + 2)


def test_shards_of_two_plans_do_not_merge(two, tmp_path):
    _set_manifest(two[1], plan="0123456789abcdef")
    with pytest.raises(errors.MixedPlans, match="0123456789abcdef: scenarios-patched-debug"):
        merge.merge(two, tmp_path / "out")


def test_a_failed_shard_is_a_verdict_with_the_report_written(two, tmp_path):
    data = _manifest(two[1])
    data["phases"][0].update(outcome="failed", message="scenarios: 1 failed")
    _set_manifest(two[1], status="failed", phases=data["phases"])
    with pytest.raises(errors.ShardsFailed) as exc:
        merge.merge(two, tmp_path / "out")
    assert exc.value.exit_code == 1 and NAMES[1] in str(exc.value)
    junit = ET.parse(tmp_path / "out" / merge.JUNIT).getroot()
    phase = next(s for s in junit.iter("testsuite") if s.get("name") == "ci phases")
    assert phase.get("failures") == "1"


def test_a_dir_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(errors.NotAShard, match="holds no shard.json"):
        merge.collect([tmp_path])


def test_globs_and_comma_lists_name_the_dirs(two):
    base = two[0].parent
    assert merge.expand([f"{base}/*"]) == sorted(two)
    assert merge.expand([f"{two[0]},{two[1]}"]) == two


def test_a_glob_skips_the_files_beside_the_shard_dirs(two):
    """`invoke ci` in lanes writes results/shards/<shard>.log and lanes.json next to the dirs."""
    base = two[0].parent
    for name in (f"{NAMES[0]}.log", "lanes.json"):
        (base / name).write_text("not a shard\n")
    assert merge.expand([f"{base}/*"]) == sorted(two)
    merge.collect(merge.expand([f"{base}/*"]))     # NotAShard if a file got through


def _invoke(*args):
    env = dict(os.environ, INVOKE_OVL_CACHE_DIR="/nonexistent-cache")
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_invoke_report_merge(two, tmp_path):
    res = _invoke("report", "--merge", f"{two[0].parent}/*", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "matrix.md").is_file() and (tmp_path / "out" / merge.JUNIT).is_file()
    res = _invoke("report", "--merge", str(two[0]), "--out", str(tmp_path / "out2"))
    assert res.returncode == 2
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert NAMES[1] in line and "fix:" in line
    res = _invoke("report", "--summary", "--merge", str(two[0]))
    assert res.returncode == 0 and res.stdout.startswith("# CI results") and "**missing**" not in res.stdout


def test_a_suite_shards_report_section_and_nested_junit_reach_the_merge(two, tmp_path):
    """fstests and unionmount shards write their verdict as a section of the shard's
    matrix.md and their JUnit under a subdir: both are in the merged results."""
    suite_dir = two[1]
    (suite_dir / "fstests").mkdir()
    (suite_dir / "fstests" / "fstests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.fstests.test_fstests" name="test_fstests[overlay/118-xfs-patched]"/>'
        '<testcase classname="tests.fstests.test_fstests" name="test_fstests[overlay/118-xfs-baseline]">'
        '<skipped message="notrun: kernel cannot reuse a volatile workdir"/></testcase>'
        '</testsuite></testsuites>')
    _set_manifest(suite_dir, junit=[*_manifest(suite_dir)["junit"], "fstests/fstests.xml"])
    section = "## fstests -overlay (base 7.2)\n\n### base fs xfs: OK"
    (suite_dir / "matrix.md").write_text(
        "# the shard's own matrix\n\n<!-- suite: fstests -overlay -->\n" + section + "\n<!-- end suite: fstests -overlay -->\n")
    m = merge.merge(two, tmp_path / "out")
    md = (tmp_path / "out" / "matrix.md").read_text()
    assert "prefix-3 ext4" in md and section in md       # the matrix and the suite's section
    assert section in (tmp_path / "out" / merge.SUMMARY).read_text()
    cases = _cases(tmp_path / "out" / merge.JUNIT)
    assert "tests.fstests.test_fstests::test_fstests[overlay/118-xfs-baseline]" in cases
    assert m.counts()["skipped"] == 1                        # notrun stays notrun, never a pass


def test_a_suite_shards_guests_name_their_accelerator(tmp_path):
    """fstests and unionmount boot guests without a scenario matrix: the accelerator each
    variant's guest used (accel.json beside their results) reaches the shard's summary."""
    from vm.machine import qemu
    from vm.suites import report

    suite = tmp_path / "fstests" / "fstests"
    suite.mkdir(parents=True)
    report.record_accel(suite, "baseline", report.accel_label(qemu.Accel("tcg", "KVM hung", 1.0)))
    report.record_accel(suite, "patched", report.accel_label(qemu.Accel("tcg", "KVM hung", 1.0)))
    assert merge.matrix_accels(tmp_path) == ["baseline: tcg (KVM hung)", "patched: tcg (KVM hung)"]
    assert not list(suite.glob(".*tmp"))
