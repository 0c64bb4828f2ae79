"""Rendering the scenario matrix from a small hand-made result set."""

import pytest

from vm.suites import report
from vm.suites.report import Matrix, Step

pytestmark = pytest.mark.unit


@pytest.fixture
def matrix() -> Matrix:
    m = Matrix(["fresh-volatile", "volatile-to-volatile", "wb-error-seen"], ["ext4", "xfs"])
    ids = {}
    for row in ("fresh-volatile", "volatile-to-volatile", "wb-error-seen"):
        for variant in ("baseline", "patched"):
            for fs in ("ext4", "xfs"):
                nodeid = f"t.py::test_row[{row}-{fs}-{variant}]"
                ids[row, fs, variant] = nodeid
                m.add_case(nodeid, row, fs, variant)

    def done(row, fs, variant, expected, actual, ok=True, message="", seconds=2.0):
        nodeid = ids[row, fs, variant]
        m.report(nodeid, "setup", "passed", 0.5, start=100.0, stop=100.5)
        m.record(nodeid, expected=expected, actual=actual, behaviour="P" if variant == "patched" else "B",
                 steps=[Step("mount volatile", "OK", "OK", True),
                        Step("remount volatile", actual, expected, ok, "" if ok else "log <x>")],
                 message=message)
        m.report(nodeid, "call", "passed" if ok else "failed", seconds, "assert failed",
                 start=100.5, stop=100.5 + seconds)
        m.report(nodeid, "teardown", "passed", 0.25)

    for fs in ("ext4", "xfs"):
        done("fresh-volatile", fs, "baseline", "OK", "OK")
        done("fresh-volatile", fs, "patched", "OK", "OK")
        done("volatile-to-volatile", fs, "baseline", "EINVAL", "EINVAL")
        done("wb-error-seen", fs, "baseline", "EINVAL", "EINVAL")
    done("volatile-to-volatile", "ext4", "patched", "OK", "OK")
    done("volatile-to-volatile", "xfs", "patched", "OK", "EINVAL", ok=False,
         message="volatile-to-volatile[xfs-patched]: remount volatile returned EINVAL, expected OK "
                 "(log: overlayfs: volatile reuse refused: instance id changed | a|b)")
    done("wb-error-seen", "ext4", "patched", "EINVAL", "EINVAL")
    nodeid = ids["wb-error-seen", "xfs", "patched"]
    m.report(nodeid, "setup", "failed", 1.0, "FlakeyError: dm-flakey ovl-flakey: busy")
    m.add_boot("baseline", 4.0)
    m.add_boot("patched", 5.5)
    return m


def test_markdown_matrix(matrix):
    md = matrix.render_markdown()
    lines = md.splitlines()
    assert lines[0] == "# Scenario matrix"
    assert "10 passed, 1 failed, 1 errors" in md
    assert "| row | baseline ext4 | baseline xfs | patched ext4 | patched xfs |" in lines
    assert "| fresh-volatile | ✓ OK | ✓ OK | ✓ OK | ✓ OK |" in lines
    assert ("| volatile-to-volatile | ✓ EINVAL | ✓ EINVAL | ✓ OK | ✗ EINVAL (expected OK) |"
            in lines)
    assert "| wb-error-seen | ✓ EINVAL | ✓ EINVAL | ✓ EINVAL | ✗ error |" in lines
    # failures, with the table-breaking "|" escaped and the label not repeated
    assert ("- `volatile-to-volatile[xfs-patched]`: remount volatile returned EINVAL, expected OK "
            "(log: overlayfs: volatile reuse refused: instance id changed \\| a\\|b)") in lines
    assert "- `wb-error-seen[xfs-patched]`: setup: FlakeyError: dm-flakey ovl-flakey: busy" in lines


def test_markdown_times_per_variant(matrix):
    lines = matrix.render_markdown().splitlines()
    # baseline: 6 scenarios x (0.5 + 2.0 + 0.25); patched: 5 x 2.75 + 1.0 (failed setup)
    assert "| baseline | 6 | 6 | 0 | 16.5 | 2.5 | 4.0 |" in lines
    assert "| patched | 6 | 4 | 2 | 14.8 | 2.5 | 5.5 |" in lines


def test_html_matrix_is_escaped_and_classed(matrix):
    html = matrix.render_html()
    assert html.startswith("<!DOCTYPE html>")
    assert '<td class="fail"' in html and '<td class="pass"' in html and '<td class="error"' in html
    assert "log &lt;x&gt;" in html and "log <x>" not in html
    assert "<th>patched<br>xfs</th>" in html


def test_write_creates_both_files(matrix, tmp_path):
    md, html = matrix.write(tmp_path / "results")
    assert md.name == "matrix.md" and html.name == "matrix.html"
    assert md.read_text() == matrix.render_markdown()
    assert html.read_text() == matrix.render_html()
    assert not list((tmp_path / "results").glob("*.tmp"))


def test_cases_that_never_ran_show_as_not_run():
    m = Matrix()
    m.add_case("a", "rebooted", "xfs", "prefix-3")
    md = m.render_markdown()
    assert "| rebooted | – not run |" in md
    assert m.counts()[report.NOT_RUN] == 1


def test_teardown_failure_turns_a_pass_into_an_error():
    m = Matrix()
    m.add_case("a", "rebooted", "ext4", "patched")
    m.report("a", "call", "passed", 1.0)
    m.report("a", "teardown", "failed", 0.1, "umount busy")
    case = m.cases["a"]
    assert case.status == report.ERROR and case.message == "teardown: umount busy"


def test_extra_rows_come_after_the_contract_rows_marked_as_extra():
    why = "series v3 review (issue 9), finding 1: a workdir in use | never reused"
    m = Matrix(["fresh-volatile", "workdir-in-use", "rebooted"], ["ext4"], extra={"workdir-in-use": why})
    for row in ("workdir-in-use", "fresh-volatile", "rebooted"):
        m.add_case(row, row, "ext4", "patched")
        m.report(row, "call", "passed", 1.0)
    assert m.rows == ["fresh-volatile", "rebooted", "workdir-in-use"]
    assert m.extra_rows == ["workdir-in-use"]
    lines = m.render_markdown().splitlines()
    table = [ln.split(" |")[0] for ln in lines if ln.startswith("| ") and "✓" in ln]
    assert table == ["| fresh-volatile", "| rebooted", "| workdir-in-use (extra)"]
    assert ("- `workdir-in-use`: series v3 review (issue 9), finding 1: a workdir in use \\| never reused"
            in lines)
    html = m.render_html()
    assert '<th class="extra" title="series v3 review' in html and "workdir-in-use <small>(extra)</small>" in html


def test_no_extra_rows_no_extra_note(matrix):
    assert "(extra)" not in matrix.render_markdown() and "(extra)" not in matrix.render_html()
