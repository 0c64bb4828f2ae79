"""vm.suites.suite: the one runner of test sessions, on a real pytest run of a small suite,
and the mutation verdict built on its results."""

from __future__ import annotations

from pathlib import Path

import pytest

from vm import errors, pipeline
from vm.suites import junit, suite
from vm.suites.suite import SuiteRequest, SuiteResult

pytestmark = pytest.mark.unit

TOY = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("the guest did not boot")

def test_ok():
    pass

def test_assertion():
    assert 1 == 2, "remount volatile returned OK, expected EINVAL"

def test_setup_error(broken):
    pass

def test_skipped():
    pytest.skip("not here")
'''


@pytest.fixture
def toy(tmp_path) -> Path:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_toy.py").write_text(TOY)
    return tmp_path


def test_argv_names_every_part_of_the_request(tmp_path):
    req = SuiteRequest(name="scenarios", tests=("tests/scenarios",), results_dir=tmp_path,
                       kernels=(("baseline", Path("/b")), ("patched@6.1", Path("/p"))), image=Path("/img"),
                       rows_for={"patched@6.1": ("wb-error-seen", "fresh-volatile")}, filesystems=("xfs",),
                       keyword="volatile", keep_vm=True, options=("--require-inputs",))
    assert req.argv("python3") == [
        "python3", "-m", "pytest", "tests/scenarios", f"--junitxml={tmp_path / 'scenarios.xml'}",
        "--kernel", "baseline=/b", "--kernel", "patched@6.1=/p", "--image", "/img",
        "--rows-for", "patched@6.1=wb-error-seen,fresh-volatile", "--fs", "xfs", "-k", "volatile",
        "--keep-vm", "--require-inputs"]


def test_request_is_frozen_including_its_row_limits(tmp_path):
    rows = {"patched": ["a"]}
    req = SuiteRequest(name="s", tests=("t",), results_dir=tmp_path, rows_for=rows)
    rows["patched"].append("b")
    assert dict(req.rows_for) == {"patched": ("a",)}
    with pytest.raises(TypeError):
        req.rows_for["x"] = ("y",)


def test_run_tells_failures_from_errors_and_skips(toy):
    req = SuiteRequest(name="toy", tests=("tests",), results_dir=toy / "results", log=toy / "toy.log")
    (toy / "results").mkdir()
    req.xml.write_text("<testsuites><testsuite><testcase name='test_stale'/></testsuite></testsuites>")
    result = suite.run(toy, req)
    assert result.returncode == 1
    assert [(c.name, c.outcome) for c in result.cases] == [
        ("test_ok", "passed"), ("test_assertion", "failed"), ("test_setup_error", "error"),
        ("test_skipped", "skipped")]
    assert result.cases[1].message.startswith("remount volatile returned OK, expected EINVAL")
    assert result.counts() == "1 error, 1 failed, 1 passed, 1 skipped"
    assert not result.passed
    with pytest.raises(errors.SuiteFailed, match=r"toy: 1 error, 1 failed, 1 passed, 1 skipped \(pytest exited 1; "
                                                 r"failing: test_assertion, test_setup_error\)"):
        result.check()
    assert "test_toy.py" in (toy / "toy.log").read_text()


def test_a_session_with_no_case_did_not_pass(toy):
    req = SuiteRequest(name="none", tests=("tests",), results_dir=toy / "results", keyword="nothing_matches",
                       log=toy / "none.log")
    result = suite.run(toy, req)
    assert result.cases == () and not result.passed
    assert "no test ran" in str(pytest.raises(errors.SuiteFailed, result.check).value)


def _result(**outcomes: str) -> SuiteResult:
    req = SuiteRequest(name="scenarios", tests=("t",), results_dir=Path("/r"))
    return SuiteResult(req, 1, tuple(junit.Case(name, outcome) for name, outcome in outcomes.items()))


TARGETED = {"test_row[wb-error-seen-ext4-patched]", "test_row[wb-error-seen-xfs-patched]"}


def test_mutation_passes_when_exactly_the_targeted_rows_fail_as_assertions():
    result = _result(**{"test_row[wb-error-seen-ext4-patched]": "failed",
                        "test_row[wb-error-seen-xfs-patched]": "failed",
                        "test_row[fresh-volatile-ext4-patched]": "passed"})
    assert pipeline.mutation_problems(result, TARGETED) == []


@pytest.mark.parametrize("outcomes,problem", [
    ({"test_row[wb-error-seen-ext4-patched]": "failed", "test_row[wb-error-seen-xfs-patched]": "error"},
     "should have failed but did not: test_row[wb-error-seen-xfs-patched]"),
    ({"test_row[wb-error-seen-ext4-patched]": "failed", "test_row[wb-error-seen-xfs-patched]": "failed",
      "test_row[rebooted-xfs-patched]": "error"}, "error: test_row[rebooted-xfs-patched]"),
    ({"test_row[wb-error-seen-ext4-patched]": "failed", "test_row[wb-error-seen-xfs-patched]": "failed",
      "test_row[fresh-volatile-xfs-patched]": "failed"},
     "unexpected failures: test_row[fresh-volatile-xfs-patched]"),
    ({"test_row[wb-error-seen-ext4-patched]": "failed", "test_row[wb-error-seen-xfs-patched]": "skipped"},
     "skipped: test_row[wb-error-seen-xfs-patched]"),
    ({}, "no test ran"),
], ids=["targeted-row-errored", "other-row-errored", "extra-failure", "skip", "nothing-ran"])
def test_mutation_counts_only_failed_assertions_of_the_targeted_rows(outcomes, problem):
    problems = pipeline.mutation_problems(_result(**outcomes), TARGETED)
    assert any(p.startswith(problem) for p in problems), problems
