"""Variants, build keys, build-log digestion and settings (no VM, no compiler)."""

from pathlib import Path

import pytest

from vm import errors, pipeline
from vm.kernel import build, kconfig
from vm.kernel.patch import parse_series
from vm.settings import Settings, load

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text,name,patches,debug", [
    ("baseline", "baseline", 0, False), ("patched", "patched", None, False),
    ("prefix-3", "prefix-3", 3, False), ("patched-debug", "patched", None, True),
], ids=["baseline", "patched", "prefix", "debug"])
def test_variant_parse(text, name, patches, debug):
    v = pipeline.Variant.parse(text)
    assert (v.name, v.patches, v.debug) == (name, patches, debug)
    assert v.label == text


def test_variant_parse_rejects_unknown():
    with pytest.raises(errors.BadArgument, match="baseline, patched or prefix-N"):
        pipeline.Variant.parse("prefix-x")


def test_prefix_variants_cover_every_prefix():
    s = load()
    labels = [v.label for v in pipeline.prefix_variants(s)]
    n = len(parse_series(s.series_file))
    assert labels == ["baseline", *[f"prefix-{i}" for i in range(1, n)], "patched"]


def _inputs(series_len: int, frag: Path) -> build.BuildInputs:
    series = parse_series(ROOT / "patches" / "6.12" / "series").prefix(series_len)
    return build.BuildInputs(label="x", tree_path=Path("/t"), tree_key="k", version="6.12.1",
                             series=series, fragments=(kconfig.parse_fragment(frag),))


def test_build_key_follows_series_and_config(tmp_path):
    frag = tmp_path / "a.config"
    frag.write_text("CONFIG_A=y\n")
    k1, k2 = _inputs(1, frag).key(), _inputs(2, frag).key()
    assert k1 != k2 and _inputs(1, frag).key() == k1
    frag.write_text("CONFIG_A=m\n")
    assert _inputs(1, frag).key() != k1


def test_error_lines_pick_compiler_errors(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("  CC      fs/super.o\n"
                   "fs/super.c:10:5: error: 'x' undeclared (first use in this function)\n"
                   "make[4]: *** [scripts/Makefile.build:229: fs/super.o] Error 1\n"
                   "  CC      fs/inode.o\n")
    lines = build.error_lines(log)
    assert lines[0].startswith("fs/super.c:10:5: error:") and len(lines) == 2


def test_progress_shows_errors_not_every_line():
    p = build.Progress("t", every=3600)
    assert not p("  CC      fs/super.o")
    assert p("fs/super.c:1:1: error: boom")
    assert p.count == 1


def test_settings_from_invoke_yaml_and_overrides():
    s = load(accel="tcg")
    assert s.base == "7.2" and s.accel == "tcg"      # the current stable kernel is the main base
    assert s.bases[0] == s.base and set(s.bases) == {"7.2", "6.12", "6.1"}
    assert s.cache_dir.is_absolute() and s.results_dir.is_absolute()
    assert s.series_file == ROOT / "patches" / "7.2" / "series"


def test_settings_reject_unknown_key():
    with pytest.raises(errors.BadArgument, match="unknown setting ovl.nope"):
        Settings.from_mapping({"nope": 1})


def test_a_base_can_have_its_own_default_source():
    s = Settings.from_mapping({"base": "6.12", "source": "debian",
                               "base_sources": {"7.2": "debian-archive:sid/linux-source-7.2"}})
    assert s.default_source == "debian"
    assert s.with_base("7.2").default_source == "debian-archive:sid/linux-source-7.2"
    assert Settings.from_mapping(s.to_dict()).base_sources == s.base_sources
