"""checkpatch output parsing, the diffstat and the cover letter template."""

from pathlib import Path

import pytest

from vm import errors
from vm.kernel import patch
from vm.kernel import series as series_tools

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


def _series(tmp_path, base="6.12", cover=None):
    """A one-patch series in <tmp>/<base>/, with the real patches/<base>/cover.toml
    unless ``cover`` gives the text of another one (False: none)."""
    d = tmp_path / base
    d.mkdir()
    (d / "0001-a.patch").write_text(
        "From 1 Mon Sep 17 00:00:00 2001\nFrom: Dev <dev@example.invalid>\n"
        "Date: Sat, 21 Nov 2026 10:00:00 +0000\nSubject: [PATCH 1/1] demo: a\n"
        " longer subject\n\nbody\n---\ndiff --git a/f.c b/f.c\n--- a/f.c\n+++ b/f.c\n"
        "@@ -1 +1,2 @@\n int a;\n+int b;\n")
    (d / "series").write_text("0001-a.patch\n")
    if cover is None:
        cover = (ROOT / "patches" / base / series_tools.COVER_DATA).read_text()
    if cover is not False:
        (d / series_tools.COVER_DATA).write_text(cover)
    return patch.parse_series(d / "series")


def _render(series, version="6.12.117"):
    return series_tools.render_cover_letter(
        series, ROOT / "patches" / "templates" / "cover-letter.j2",
        diffstat_text=" f.c | 1 +", base_version=version, base_commit=None)


def test_diffstat_of_the_series(tmp_path):
    series = _series(tmp_path)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    (pristine / "f.c").write_text("int a;\n")
    patched = patch.prepare_source(pristine, series, tmp_path / "patched")
    stat = series_tools.diffstat(pristine, patched, series)
    assert "f.c | 1 +" in stat and "1 file changed, 1 insertion(+)" in stat


def test_real_template_renders_every_patch_and_base(tmp_path):
    text = _render(_series(tmp_path))
    assert "Subject: [PATCH v3 0/1] overlay: reusable volatile mounts" in text
    assert "demo: a longer subject" in text
    assert "6.12.117" in text and " f.c | 1 +" in text
    assert "From: Dev <dev@example.invalid>" in text
    for reviewer in ("Amir Goldstein", "Vivek Goyal"):
        assert reviewer in text, "the answers to the review objections name who raised them"


def test_6_12_wording_comes_from_its_cover_data(tmp_path):
    text = _render(_series(tmp_path))
    assert "  - Rebased onto Linux 6.12.117: new mount API (fs/overlayfs/params.c),\n    today's" in text
    assert "Base: Linux 6.12.117 (Debian linux-source-6.12)" in text
    # no port note: the patch overview is followed directly by the changes
    assert "builds on its own.\n\nChanges since v2" in text


def test_6_1_renders_the_6_1_port(tmp_path):
    text = _render(_series(tmp_path, "6.1"), "6.1.192")
    assert "Base: Linux 6.1.192 (Debian linux-source-6.1)" in text
    assert "linux-source-6.12" not in text and "new mount API (fs/overlayfs/params.c)" not in text
    assert "  - Rebased onto Linux 6.1.192: its overlayfs predates" in text
    assert "ovl_parse_opt()" in text and "mount_nodev()" in text
    assert "builds on its own.\n\nThis is the backport of the series to Linux 6.1 LTS." in text
    assert "ofs->config.ovl_volatile" in text
    assert "same as in the 6.12 version.\n\nChanges since v2" in text
    # the parts that hold for every base are still there
    assert "Amir Goldstein" in text and "335d3fc57941" in text


def test_missing_cover_data_is_a_clear_error(tmp_path):
    with pytest.raises(errors.SeriesError) as exc:
        _render(_series(tmp_path, "6.6", cover=False), "6.6.1")
    msg = str(exc.value)
    assert "6.6/cover.toml" in msg and "no per-base cover letter data" in msg
    assert "rebased (required)" in msg and "port_note (optional)" in msg


#: the other required keys, for the cases about one key
SITE_AND_LOCKING = 'instance_id_site = "sget_fc() publishes"\nincompat_check_locking = "none"\n'


@pytest.mark.parametrize("cover, reason", [
    ('port_note = "x"\n' + SITE_AND_LOCKING, "missing or empty keys rebased"),
    ('rebased = ""\n' + SITE_AND_LOCKING, "missing or empty keys rebased"),
    ('rebased = "x"\nincompat_check_locking = "none"\n', "missing or empty keys instance_id_site"),
    ('rebased = "x"\nrebase_note = "typo"\n' + SITE_AND_LOCKING, "unknown keys rebase_note"),
    ('rebased = ["x"]\n' + SITE_AND_LOCKING, "keys that are not strings rebased"),
    ('rebased = """x\n', "not valid TOML"),
])
def test_bad_cover_data_is_refused(tmp_path, cover, reason):
    with pytest.raises(errors.SeriesError, match=reason):
        _render(_series(tmp_path, cover=cover))


def test_port_note_is_optional(tmp_path):
    text = _render(_series(tmp_path, cover='rebased = "something"\n' + SITE_AND_LOCKING))
    assert "Rebased onto Linux 6.12.117: something\n" in text
    assert "assigned under sb_lock where sget_fc() publishes;\n" in text
    assert "no additional lock.  Locking:\nnone.\n" in text
    assert "builds on its own.\n\nChanges since v2" in text


def test_stale_cover_letter_error_names_the_base():
    err = errors.StaleCoverLetter(path=ROOT / "patches" / "6.1" / series_tools.COVER_NAME)
    assert "invoke cover-letter --base 6.1" in str(err)


BASES = sorted(p.parent.name for p in (ROOT / "patches").glob("*/series"))


def test_both_bases_are_there():
    assert {"6.1", "6.12"} <= set(BASES)


@pytest.mark.parametrize("base", BASES)
def test_committed_cover_letter_lists_the_series(base):
    series = patch.parse_series(ROOT / "patches" / base / "series")
    text = (ROOT / "patches" / base / series_tools.COVER_NAME).read_text()
    for p in series.patches:
        assert p.subject() in text
    assert f"(Debian linux-source-{base})" in text
    series_tools.load_cover_data(ROOT / "patches" / base / series_tools.COVER_DATA)
