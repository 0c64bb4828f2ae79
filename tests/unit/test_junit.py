"""Reading pytest's JUnit XML: a failed scenario is not a guest that did not boot."""

import pytest

from vm.suites import junit

pytestmark = pytest.mark.unit

XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="t" name="test_row[a-ext4-patched]" time="1"/>
<testcase classname="t" name="test_row[b-ext4-patched]" time="1">
  <failure message="vm.errors.ExpectationFailed: b[ext4-patched]: remount volatile returned OK, expected EINVAL&#10;more">x</failure>
</testcase>
<testcase classname="t" name="test_row[c-ext4-patched]" time="1">
  <error message="failed on setup with &quot;vm.errors.GuestBootFailed: guest panicked&quot;">x</error>
</testcase>
<testcase classname="t" name="test_row[d-ext4-patched]" time="0"><skipped message="no scratch disk"/></testcase>
</testsuite></testsuites>
"""


def test_cases_tell_failure_from_setup_error(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(XML)
    cases = {c.name: c for c in junit.cases(path)}
    assert cases["test_row[a-ext4-patched]"].outcome == "passed"
    failed = cases["test_row[b-ext4-patched]"]
    assert failed.outcome == "failed"
    assert failed.message == "b[ext4-patched]: remount volatile returned OK, expected EINVAL"
    assert cases["test_row[c-ext4-patched]"].outcome == "error"
    assert "guest panicked" in cases["test_row[c-ext4-patched]"].message
    assert cases["test_row[d-ext4-patched]"].outcome == "skipped"
    # the older view used by `invoke mutation` counts setup errors as failures
    assert junit.outcomes(path)["test_row[c-ext4-patched]"] == "failed"
