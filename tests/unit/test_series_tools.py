"""checkpatch output parsing, the diffstat and the cover letter template."""

from pathlib import Path

import pytest

from vm import errors, patch, series_tools

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

CLEAN = """total: 0 errors, 0 warnings, 0 checks, 120 lines checked

0001-x.patch has no obvious style problems and is ready for submission.
"""
DIRTY = """WARNING:LONG_LINE: line length of 120 exceeds 100 columns
#42: FILE: fs/overlayfs/super.c:100:

CHECK:PARENTHESIS_ALIGNMENT: Alignment should match open parenthesis
total: 0 errors, 1 warnings, 1 checks, 33 lines checked
"""


def test_parse_checkpatch_clean_and_dirty():
    assert series_tools.parse_checkpatch("a", CLEAN).clean
    dirty = series_tools.parse_checkpatch("b", DIRTY)
    assert (dirty.errors, dirty.warnings, dirty.checks, dirty.clean) == (0, 1, 1, False)


def test_parse_checkpatch_without_summary_is_an_error():
    with pytest.raises(errors.CommandFailed):
        series_tools.parse_checkpatch("c", "perl: cannot open")


def _series(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "0001-a.patch").write_text(
        "From 1 Mon Sep 17 00:00:00 2001\nFrom: Dev <dev@example.invalid>\n"
        "Date: Sat, 21 Nov 2026 10:00:00 +0000\nSubject: [PATCH 1/1] demo: a\n"
        " longer subject\n\nbody\n---\ndiff --git a/f.c b/f.c\n--- a/f.c\n+++ b/f.c\n"
        "@@ -1 +1,2 @@\n int a;\n+int b;\n")
    (d / "series").write_text("0001-a.patch\n")
    return patch.parse_series(d / "series")


def test_diffstat_of_the_series(tmp_path):
    series = _series(tmp_path)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    (pristine / "f.c").write_text("int a;\n")
    patched = patch.prepare_source(pristine, series, tmp_path / "patched")
    stat = series_tools.diffstat(pristine, patched, series)
    assert "f.c | 1 +" in stat and "1 file changed, 1 insertion(+)" in stat


def test_real_template_renders_every_patch_and_base(tmp_path):
    series = _series(tmp_path)
    text = series_tools.render_cover_letter(
        series, ROOT / "patches" / "templates" / "cover-letter.j2",
        diffstat_text=" f.c | 1 +", base_version="6.12.117", base_commit=None)
    assert "Subject: [PATCH v3 0/1] overlay: reusable volatile mounts" in text
    assert "demo: a longer subject" in text
    assert "6.12.117" in text and " f.c | 1 +" in text
    assert "From: Dev <dev@example.invalid>" in text
    for reviewer in ("Amir Goldstein", "Vivek Goyal"):
        assert reviewer in text, "the answers to the review objections name who raised them"


def test_committed_cover_letter_lists_the_series():
    series = patch.parse_series(ROOT / "patches" / "6.12" / "series")
    text = (ROOT / "patches" / "6.12" / series_tools.COVER_NAME).read_text()
    for p in series.patches:
        assert p.subject() in text
