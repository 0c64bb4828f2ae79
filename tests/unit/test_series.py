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


def test_every_base_is_there():
    assert {"6.1", "6.12", "7.2"} <= set(BASES)


@pytest.mark.parametrize("base", BASES)
def test_committed_cover_letter_lists_the_series(base):
    series = patch.parse_series(ROOT / "patches" / base / "series")
    text = (ROOT / "patches" / base / series_tools.COVER_NAME).read_text()
    for p in series.patches:
        assert p.subject() in text
    assert f"(Debian linux-source-{base})" in text
    series_tools.load_cover_data(ROOT / "patches" / base / series_tools.COVER_DATA)


# --- who sends the series, and to whom ----------------------------------------------

def _patch_file(tmp_path, name, author, signoffs):
    body = "".join(f"Signed-off-by: {s}\n" for s in signoffs)
    path = tmp_path / name
    path.write_text(f"From 1 Mon Sep 17 00:00:00 2001\nFrom: {author}\n"
                    f"Date: Sat, 21 Nov 2026 10:00:00 +0000\nSubject: [PATCH] x\n\nwhy\n\n{body}---\n"
                    "diff --git a/f b/f\n+Signed-off-by: in the diff does not count\n")
    return path


def test_header_is_unfolded(tmp_path):
    path = tmp_path / "p.patch"
    path.write_text("From 1 Mon Sep 17 00:00:00 2001\nFrom: A Very Long Name\n <a@example.org>\n"
                    "Date: Sat, 21 Nov 2026 10:00:00 +0000\nSubject: x\n\nbody\n")
    assert series_tools._header(path, "From") == "A Very Long Name <a@example.org>"
    assert series_tools._header(path, "Date") == "Sat, 21 Nov 2026 10:00:00 +0000"
    assert series_tools._header(path, "Cc") is None


@pytest.mark.parametrize("author, signoffs, problem", [
    ("Ann Dev <ann@kernel.example.org>", ["Ann Dev <ann@kernel.example.org>"], None),
    ("ovl-volatile-harness dev <dev@ovl-volatile-harness.invalid>",
     ["ovl-volatile-harness dev <dev@ovl-volatile-harness.invalid>"], "is not a real identity"),
    ("Ann Dev", ["Ann Dev"], "is not a real identity"),
    ("Ann Dev <ann@kernel.example.org>", ["Bob <bob@kernel.example.org>"], "not signed off by its author"),
    ("Ann Dev <ann@kernel.example.org>", [], "not signed off by its author"),
], ids=["real", "placeholder", "no-address", "other-signoff", "no-signoff"])
def test_identity_problems(tmp_path, author, signoffs, problem):
    p = _patch_file(tmp_path, "0001-x.patch", author, signoffs)
    (tmp_path / "series").write_text("0001-x.patch\n")
    found = series_tools.identity_problems(patch.parse_series(tmp_path / "series"))
    assert (problem is None and not found) or (problem and problem in found[0] and p.name in found[0])


@pytest.mark.parametrize("base", sorted(p.parent.name for p in (ROOT / "patches").glob("*/series")))
def test_committed_series_carries_a_real_identity(base):
    """The placeholder identity of earlier versions never goes out (review finding 8)."""
    assert series_tools.identity_problems(patch.parse_series(ROOT / "patches" / base / "series")) == []


def test_recipients_are_grouped_and_rendered(tmp_path):
    series = _series(tmp_path)
    two = series.path.parent / "0002-b.patch"
    two.write_text((series.path.parent / "0001-a.patch").read_text().replace("1/1] demo: a", "2/2] demo: b"))
    series.path.write_text("0001-a.patch\n0002-b.patch\n")
    series = patch.parse_series(series.path)
    vfs = ("Al <viro@example.org>", "linux-fsdevel@vger.kernel.org")
    groups = series_tools._recipient_groups(series, [series_tools.Recipients("0001-a.patch", vfs),
                                                     series_tools.Recipients("0002-b.patch", vfs)])
    assert groups == [{"first": 1, "last": 2, "to": list(vfs), "patches": "1-2"}]
    text = series_tools.render_cover_letter(
        series, ROOT / "patches" / "templates" / "cover-letter.j2", diffstat_text=" f.c | 1 +",
        base_version="6.12.117", base_commit=None,
        recipients=[series_tools.Recipients("0001-a.patch", vfs),
                    series_tools.Recipients("0002-b.patch", ("Miklos <m@example.org>",))])
    assert "Cc: Al <viro@example.org>,\n    linux-fsdevel@vger.kernel.org,\n    Miklos <m@example.org>\n" in text
    assert "  patch 1:\n    Al <viro@example.org>\n    linux-fsdevel@vger.kernel.org\n  patch 2:\n" in text


def test_stale_reason_names_a_moved_base():
    text = "x\nBase: Linux 6.12.117 (Debian linux-source-6.12)\n"
    why = series_tools.stale_reason(text, "6.12.118")
    assert "Linux 6.12.117" in why and "Linux 6.12.118" in why
    assert series_tools.stale_reason(text, "6.12.117") == ""
    assert series_tools.stale_reason("no base line\n", "6.12.118") == ""
    err = errors.StaleCoverLetter(path=Path("patches/6.12/0000-cover-letter.patch"), why=why)
    assert "(it names Linux 6.12.117" in str(err) and "--base 6.12" in str(err)
