"""fstests and unionmount-testsuite plumbing without a VM: check.log and xunit parsing
against saved real output (tests/data/fstests/, from `./check -overlay -R xunit` in this
harness's guest), the regression diff, known-failures loading, local.config rendering,
test/group selection against a real group.list, the suite-tree fetch and the disk cache."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from vm import errors
from vm.kernel import fetch
from vm.suites import fstests, report
from vm.suites.fstests import FAILED, NOTRUN, PASSED, KnownFailures, TestResult
from vm.suites.junit import Case

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "fstests"


# --- parsers against real output ------------------------------------------------------

def test_check_log_lists_what_ran_was_notrun_and_failed():
    log = fstests.parse_check_log((DATA / "check.log").read_text())
    assert "overlay/118" in log.ran
    assert set(log.notrun) <= set(log.ran) and set(log.failures) <= set(log.ran)
    assert log.notrun and not set(log.notrun) & set(log.failures)


def test_xunit_tells_pass_notrun_and_failure_apart():
    results = {r.test: r for r in fstests.parse_xunit((DATA / "result.xml").read_text())}
    assert results["overlay/118"].outcome == PASSED
    notrun = [r for r in results.values() if r.outcome == NOTRUN]
    assert notrun and all(r.message for r in notrun)     # a notrun keeps its reason


def test_xunit_failure_message():
    xml = ('<testsuite><testcase classname="xfstests.global" name="overlay/118" time="7">'
           '<failure message="- output mismatch (see x.out.bad)" type="TestFail" /></testcase></testsuite>')
    (r,) = fstests.parse_xunit(xml)
    assert (r.outcome, r.message, r.seconds) == (FAILED, "- output mismatch (see x.out.bad)", 7.0)


# --- the regression diff ----------------------------------------------------------------

def _r(**outcomes) -> dict[str, TestResult]:
    return {f"overlay/{k[1:]}": TestResult(f"overlay/{k[1:]}", v, "msg") for k, v in outcomes.items()}


KNOWN = KnownFailures.from_data({
    "failures": [{"test": "overlay/004", "fs": ["ext4"], "reason": "known on ext4"}],
    "expect": {"overlay/118": {"baseline": NOTRUN, "patched": PASSED, "reason": "the series' own test"}}})


@pytest.mark.parametrize("b, p, bucket", [
    (PASSED, FAILED, "regressions"),
    (NOTRUN, FAILED, "regressions"),
    (FAILED, FAILED, "pre_existing"),
    (FAILED, PASSED, "fixed"),
    (PASSED, PASSED, None),
], ids=["pass-to-fail", "notrun-to-fail", "fail-both", "fixed", "pass-both"])
def test_diff_buckets(b, p, bucket):
    diff = fstests.regression_diff("xfs", _r(t001=b), _r(t001=p), KnownFailures())
    for name in ("regressions", "pre_existing", "fixed"):
        assert bool(getattr(diff, name)) == (name == bucket), name
    assert diff.ok == (bucket != "regressions")


def test_known_failure_needs_its_fs():
    on_ext4 = fstests.regression_diff("ext4", _r(t004=PASSED), _r(t004=FAILED), KNOWN)
    on_xfs = fstests.regression_diff("xfs", _r(t004=PASSED), _r(t004=FAILED), KNOWN)
    assert on_ext4.ok and on_ext4.known == ("overlay/004: known on ext4",)
    assert not on_xfs.ok


@pytest.mark.parametrize("b, p, ok", [(NOTRUN, PASSED, True), (NOTRUN, FAILED, False), (PASSED, PASSED, False),
                                      (NOTRUN, NOTRUN, False)],
                         ids=["as-expected", "fails-on-P", "reuse-on-B", "notrun-on-P"])
def test_the_series_own_test_is_held_to_its_expectation(b, p, ok):
    diff = fstests.regression_diff("xfs", _r(t118=b), _r(t118=p), KNOWN)
    assert diff.ok == ok
    assert any("overlay/118 (baseline)" in n for n in diff.notrun) == (b == NOTRUN)   # notrun is listed


def test_a_test_missing_on_one_kernel_fails_the_diff():
    diff = fstests.regression_diff("xfs", _r(t001=PASSED), {}, KnownFailures())
    assert not diff.ok and diff.missing


def test_judge_reads_pytest_cases_and_a_mutation_counts_as_patched():
    cases = [Case("test_fstests[overlay/118-xfs-baseline]", "skipped", "notrun: kernel cannot reuse"),
             Case("test_fstests[overlay/118-xfs-prefix-3]", "failed", "output mismatch")]
    verdict = fstests.judge(cases, KNOWN, ["baseline", "prefix-3"], ["xfs"])
    assert not verdict.ok
    assert "prefix-3 failed, expected passed" in verdict.diffs[0].unexpected[0]
    assert "REGRESSION" in verdict.render("fstests", "7.2")


def test_judge_without_cases_is_a_problem():
    assert not fstests.judge([], KnownFailures(), ["baseline", "patched"], ["xfs"], returncode=3).ok


def test_case_key_splits_ids_with_dashes():
    assert fstests.case_key("test_fstests[overlay/118-ext4-patched-debug]") == ("overlay/118", "ext4",
                                                                               "patched-debug")


# --- known failures data --------------------------------------------------------------

@pytest.mark.parametrize("data", [
    {"failures": [{"test": "overlay/001", "reason": " "}]},
    {"failures": [{"reason": "x"}]},
    {"expect": {"overlay/118": {"patched": PASSED}}},
    {"expect": {"overlay/118": {"patched": "pass", "reason": "x"}}},
], ids=["blank-reason", "no-test", "expect-without-reason", "bad-outcome"])
def test_known_failures_need_a_reason_and_real_outcomes(data):
    with pytest.raises(errors.ExpectationError):
        KnownFailures.from_data(data)


def test_every_base_has_its_known_failures_file():
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "tests" / "fstests" / "known-failures").glob("*.json")):
        known = KnownFailures.load(path)
        assert known.expect["overlay/118"]["patched"] == PASSED


# --- local.config, selection -----------------------------------------------------------

def test_local_config_for_an_overlay_run():
    text = fstests.local_config("xfs", "/dev/vdc", "/dev/vdd", "volatile")
    for line in ("export FSTYP=xfs", "export TEST_DEV=/dev/vdc", "export SCRATCH_DEV=/dev/vdd",
                 f"export TEST_DIR={fstests.TEST_DIR}", f"export SCRATCH_MNT={fstests.SCRATCH_MNT}",
                 'export OVERLAY_MOUNT_OPTIONS="-o volatile"'):
        assert line in text.splitlines()
    assert "OVERLAY_MOUNT_OPTIONS" not in fstests.local_config("ext4", "/dev/a", "/dev/b")
    assert "UNIONMOUNT_TESTSUITE" not in text
    # overlay/100-117 (-g overlay/union) run unionmount-testsuite from there; notrun without it
    union = fstests.local_config("ext4", "/dev/a", "/dev/b", unionmount=fstests.UNIONMOUNT_DIR)
    assert f"export UNIONMOUNT_TESTSUITE={fstests.UNIONMOUNT_DIR}" in union.splitlines()
    with pytest.raises(errors.BadArgument):
        fstests.local_config("btrfs", "/dev/a", "/dev/b")


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "xfstests"
    (root / "tests" / "overlay").mkdir(parents=True)
    (root / "check").write_text("#!/bin/bash\n")
    (root / "VERSION").write_text("PACKAGE_MAJOR=1\nPACKAGE_MINOR=1\nPACKAGE_REVISION=1\n")
    (root / "tests" / "overlay" / "group.list").write_text((DATA / "group.list").read_text())
    for n in ("001", "118"):
        (root / "tests" / "overlay" / n).write_text("#! /bin/bash\n")
    return root


def test_select_expands_groups_and_names_unknown_ones(tree):
    quick = fstests.select(tree, ["overlay/quick"])
    assert "overlay/001" in quick and quick == sorted(quick)
    assert fstests.select(tree, [], ["overlay/118"]) == ["overlay/118"]
    with pytest.raises(errors.BadArgument, match="unknown fstests group 'overlay/nosuch'"):
        fstests.select(tree, ["overlay/nosuch"])
    with pytest.raises(errors.BadArgument, match="unknown fstests test 'overlay/999'"):
        fstests.select(tree, [], ["overlay/999"])
    with pytest.raises(errors.BadArgument):
        fstests.select(tree)


def test_version_recognises_only_an_fstests_tree(tree, tmp_path):
    assert fstests.fstests_version(tree) == "fstests 1.1.1"
    assert fstests.fstests_version(tmp_path) is None


# --- fetch of a suite tarball, and the disk cache -----------------------------------------

def _tarball(path: Path, top: str, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mode = 0o755
            tf.addfile(info, io.BytesIO(data))
    return path


UM = fetch.TreeKind("unionmount-testsuite tree", fstests.unionmount_version, "use a unionmount tarball")


def test_fetch_suite_tarball_by_path_and_sha(tmp_path):
    tb = _tarball(tmp_path / "um.tar.gz", "um", {"run": "#!/bin/sh\n", "tests/a.py": "x\n"})
    sha = fetch._sha_file(tb)
    tree = fetch.fetch(fetch.SourceSpec.parse(f"tarball:{tb}#sha256={sha}", "6.12"), tmp_path / "c", kind=UM)
    assert (tree.path / "run").is_file() and tree.version == "unionmount-testsuite"
    again = fetch.fetch(fetch.SourceSpec.parse(f"tarball:{tb}#sha256={sha}", "6.12"), tmp_path / "c", kind=UM)
    assert again.path == tree.path


def test_fetch_suite_tarball_refuses_a_wrong_checksum_and_a_wrong_tree(tmp_path):
    tb = _tarball(tmp_path / "um.tar.gz", "um", {"run": "#!/bin/sh\n", "tests/a.py": "x\n"})
    with pytest.raises(errors.ChecksumMismatch):
        fetch.fetch(fetch.SourceSpec.parse(f"tarball:{tb}#sha256={'0' * 64}", "6.12"), tmp_path / "c", kind=UM)
    other = _tarball(tmp_path / "other.tar.gz", "x", {"README": "no\n"})
    with pytest.raises(errors.CorruptTarball, match="not a unionmount-testsuite tree"):
        fetch.fetch(fetch.SourceSpec.parse(f"tarball:{other}", "6.12"), tmp_path / "c", kind=UM)
    with pytest.raises(errors.SourceNotFound):
        fetch.fetch(fetch.SourceSpec.parse(f"tarball:{tmp_path / 'missing.tar.gz'}", "6.12"), tmp_path / "c",
                    kind=UM)
    assert not [p for p in (tmp_path / "c" / "trees").iterdir()]          # nothing half-cached


def test_build_disk_failure_leaves_nothing_cached(tmp_path, tree):
    (tree / "Makefile").write_text("all:\n\t@echo 'error: no compiler today' && false\n")
    with pytest.raises(errors.SuiteBuildFailed, match="no compiler today"):
        fstests.build_disk("fstests", tree, "k", [], tmp_path / "b", make=True)
    left = [p.name for p in (tmp_path / "b").iterdir() if not p.name.endswith(".lock")]
    assert left == ["fstests-build-failed.log"]                # the log, no tree, no disk


def test_build_disk_patch_that_does_not_apply(tmp_path, tree):
    bad = tmp_path / "0001-x.patch"
    bad.write_text("--- a/check\n+++ b/check\n@@ -1 +1 @@\n-nothing like this\n+x\n")
    with pytest.raises(errors.SuitePatchDoesNotApply):
        fstests.build_disk("fstests", tree, "k", [bad], tmp_path / "b", make=False)
    assert [p.name for p in (tmp_path / "b").iterdir() if not p.name.endswith(".lock")] == []


def test_disk_key_follows_the_patches(tmp_path):
    p = tmp_path / "0001-a.patch"
    p.write_text("one")
    k1 = fstests.disk_key("tree", [p])
    p.write_text("two")
    assert fstests.disk_key("tree", [p]) != k1 and fstests.disk_key("tree", []) != k1


def test_leftover_mounts_and_unmount_order():
    mounts = ("tmpfs /lower tmpfs rw 0 0\noverlay /mnt overlay rw 0 0\ntmpfs /upper/0 tmpfs rw 0 0\n"
              "/dev/vda / ext4 rw 0 0\n/dev/vdc /mnt/test xfs rw 0 0\n")
    left = fstests.leftover_mounts(mounts)
    assert left == ["/lower", "/mnt", "/upper/0", "/mnt/test"]
    argv = fstests.unmount_argv(left)
    assert argv[argv.index("sh", 1) + 1:][:2] == ["/mnt/test", "/upper/0"]


def test_merge_section_replaces_its_own_section(tmp_path):
    md = tmp_path / "matrix.md"
    md.write_text("# scenario matrix\n")
    report.merge_section(md, "fstests", "## fstests\none")
    report.merge_section(md, "fstests", "## fstests\ntwo")
    report.merge_section(md, "unionmount", "## unionmount\nok")
    text = md.read_text()
    assert text.startswith("# scenario matrix") and "one" not in text
    assert text.count("## fstests") == 1 and "## unionmount" in text


def test_a_shared_path_is_found_from_a_clone_that_is_not_beside_it(tmp_path):
    """CI clones the project elsewhere: ../shared/vendor/... is then looked up in ovl.shared_dirs."""
    from dataclasses import replace

    from vm import pipeline
    from vm.settings import load

    clone, elsewhere = tmp_path / "ci" / "clone", tmp_path / "work" / "shared"
    clone.mkdir(parents=True)
    (elsewhere / "vendor").mkdir(parents=True)
    (elsewhere / "vendor" / "suite.tar.gz").write_bytes(b"x")
    sha = "a" * 64
    s = replace(load(), project_root=clone, shared_dirs=("../shared", str(elsewhere)),
                fstests_source=f"tarball:../shared/vendor/suite.tar.gz#sha256={sha}")
    spec = pipeline.suite_source(s, "fstests")
    assert Path(spec.value) == elsewhere / "vendor" / "suite.tar.gz" and spec.sha256 == sha
    (clone.parent / "shared" / "vendor").mkdir(parents=True)          # beside the clone: it wins
    (clone.parent / "shared" / "vendor" / "suite.tar.gz").write_bytes(b"x")
    assert Path(pipeline.suite_source(s, "fstests").value).resolve() == clone.parent / "shared" / "vendor" / "suite.tar.gz"
    # nowhere: the checkout-relative path, which the fetch then names as missing
    gone = replace(s, shared_dirs=("../shared", str(tmp_path / "nothing")),
                   fstests_source="tarball:../shared/vendor/other.tar.gz")
    assert Path(pipeline.suite_source(gone, "fstests").value).resolve() == clone.parent / "shared" / "vendor" / "other.tar.gz"


def test_each_run_has_a_matrix_section_of_its_own():
    """The main tier's run and the two full-tier shards (one per fs) write sections that a
    merge keeps side by side: the same key made the last shard's overwrite the others'."""
    from vm import ci
    from vm.settings import load

    s = load()
    phases = [p for p in ci.plan(s, full=True) if p.kind in ("fstests", "fstests_full")]
    titles = {fstests.section_title(s.fstests_full_groups if p.kind == "fstests_full" else (),
                                    p.filesystems or s.fstests_ci_fs) for p in phases}
    assert len(phases) == 3 and len(titles) == 3, titles
