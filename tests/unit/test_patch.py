"""Series parsing and applying onto a copy of a pristine tree."""

import os
from pathlib import Path

import pytest

from vm import errors
from vm.kernel import patch

pytestmark = pytest.mark.unit

GOOD = """\
From 1111111111111111111111111111111111111111 Mon Sep 17 00:00:00 2001
From: Dev <dev@example.invalid>
Subject: [PATCH 1/2] demo: change the greeting
 over two lines

---
 hello.c | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

diff --git a/hello.c b/hello.c
--- a/hello.c
+++ b/hello.c
@@ -1,3 +1,3 @@
 int main(void)
 {
-\treturn 0;
+\treturn 1;
--
2.39.5
"""

BAD = """\
Subject: [PATCH 2/2] demo: touch a line that is not there

diff --git a/hello.c b/hello.c
--- a/hello.c
+++ b/hello.c
@@ -10,3 +10,3 @@
 nothing
-like
+this
 here
"""


@pytest.fixture
def pristine(tmp_path):
    tree = tmp_path / "pristine"
    tree.mkdir()
    (tree / "hello.c").write_text("int main(void)\n{\n\treturn 0;\n}\n")
    (tree / "other.c").write_text("int x;\n")
    return tree


def write_series(dirpath: Path, entries: dict[str, str], lines: list[str]) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    for name, text in entries.items():
        (dirpath / name).write_text(text)
    series = dirpath / "series"
    series.write_text("\n".join(lines) + "\n")
    return series


def test_parse_series_comments_and_strip(tmp_path):
    s = write_series(tmp_path / "p", {"a.patch": GOOD, "b.patch": GOOD},
                     ["# the series", "a.patch", "", "b.patch -p0  # trailing comment"])
    series = patch.parse_series(s)
    assert [p.name for p in series.patches] == ["a.patch", "b.patch"]
    assert [p.strip for p in series.patches] == [1, 0]
    assert series.patches[0].subject() == "demo: change the greeting over two lines"


def test_parse_series_missing_patch(tmp_path):
    s = write_series(tmp_path / "p", {}, ["nope.patch"])
    with pytest.raises(errors.SeriesError, match=r"series:1: patch nope.patch does not exist"):
        patch.parse_series(s)


def test_parse_series_unknown_option(tmp_path):
    s = write_series(tmp_path / "p", {"a.patch": GOOD}, ["a.patch -R"])
    with pytest.raises(errors.SeriesError, match="unknown option '-R'"):
        patch.parse_series(s)


def test_fingerprint_follows_content_and_order(tmp_path):
    s = patch.parse_series(write_series(tmp_path / "p", {"a.patch": GOOD, "b.patch": BAD},
                                        ["a.patch", "b.patch"]))
    swapped = patch.parse_series(write_series(tmp_path / "q", {"a.patch": GOOD, "b.patch": BAD},
                                              ["b.patch", "a.patch"]))
    assert s.fingerprint() != swapped.fingerprint()
    assert s.prefix(1).fingerprint() != s.fingerprint()
    with pytest.raises(errors.BadArgument):
        s.prefix(3)


def test_apply_good_series_leaves_pristine_untouched(tmp_path, pristine):
    series = patch.parse_series(write_series(tmp_path / "p", {"a.patch": GOOD}, ["a.patch"]))
    inode = os.stat(pristine / "hello.c").st_ino
    dest = patch.prepare_source(pristine, series, tmp_path / "builds" / "src")
    assert "return 1;" in (dest / "hello.c").read_text()
    assert "return 0;" in (pristine / "hello.c").read_text()
    assert os.stat(pristine / "hello.c").st_ino == inode
    # untouched files are shared (hard links), not copied
    assert os.stat(dest / "other.c").st_ino == os.stat(pristine / "other.c").st_ino
    assert patch.prepare_source(pristine, series, dest) == dest  # reused


def test_failing_patch_names_file_and_hunk_and_leaves_nothing(tmp_path, pristine):
    series = patch.parse_series(write_series(tmp_path / "p", {"a.patch": GOOD, "b.patch": BAD},
                                             ["a.patch", "b.patch"]))
    builds = tmp_path / "builds"
    with pytest.raises(errors.PatchDoesNotApply) as exc:
        patch.prepare_source(pristine, series, builds / "src")
    msg = str(exc.value)
    assert "b.patch does not apply" in msg
    assert "hello.c hunk #1" in msg
    assert "\n" not in msg
    assert list(builds.iterdir()) == [], "no partly patched tree may remain"
    assert "return 0;" in (pristine / "hello.c").read_text()


def test_describe_failure_variants():
    assert "already contains" in patch.describe_failure(
        "patching file fs/a.c\nReversed (or previously applied) patch detected!  Skipping patch.")
    assert "does not exist" in patch.describe_failure("can't find file to patch at input line 5")
    assert "malformed" in patch.describe_failure("patch: **** malformed patch at line 9: x")
