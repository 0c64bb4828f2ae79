"""kconfig fragments: parsing, validation, and a real merge with a dropped option."""

import os
import tempfile
from pathlib import Path

import pytest

from vm import errors, pipeline
from vm.kernel import kconfig
from vm.settings import load

pytestmark = pytest.mark.unit
KCONFIG_DIR = Path(__file__).resolve().parents[2] / "kconfig"


def test_parse_lines_reads_values_and_unset():
    opts = kconfig.parse_lines(["CONFIG_A=y", "CONFIG_B=m", 'CONFIG_C="x y"', "# CONFIG_D is not set",
                                "# a comment", ""])
    assert opts == {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": '"x y"', "CONFIG_D": "n"}


@pytest.mark.parametrize("line", ["CONFIG_A=n", "OVERLAY_FS=m", "CONFIG_A y"], ids=["eq-n", "no-prefix", "no-eq"])
def test_parse_lines_rejects_bad_syntax(line):
    with pytest.raises(errors.BadFragment) as exc:
        kconfig.parse_lines([line], "frag.config")
    assert "frag.config:1" in str(exc.value) and "fix:" in str(exc.value)


def test_dropped_options_names_each_one():
    wanted = {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": "n"}
    final = {"CONFIG_A": "y", "CONFIG_C": "y"}
    assert kconfig.dropped_options(wanted, final) == ["CONFIG_B=m (got not set)", "CONFIG_C=n (got y)"]


def test_validate_raises_with_names(tmp_path):
    cfg = tmp_path / ".config"
    cfg.write_text("CONFIG_A=y\n# CONFIG_B is not set\n")
    kconfig.validate({"CONFIG_A": "y"}, cfg)
    with pytest.raises(errors.ConfigOptionsDropped, match=r"1 requested option\(s\).*CONFIG_B=y"):
        kconfig.validate({"CONFIG_B": "y"}, cfg)


def test_shipped_fragments_parse():
    for frag in KCONFIG_DIR.glob("*.config"):
        assert kconfig.parse_fragment(frag).options, frag


def test_later_fragment_overrides_earlier(tmp_path):
    a, b = tmp_path / "a.config", tmp_path / "b.config"
    a.write_text("CONFIG_X=y\nCONFIG_Y=y\n")
    b.write_text("# CONFIG_X is not set\n")
    frags = kconfig.resolve_fragments([str(a), str(b)], tmp_path)
    assert kconfig.requested(frags) == {"CONFIG_X": "n", "CONFIG_Y": "y"}


def _frags(tmp_path, **texts):
    """Fragments in a directory of their own (a fresh one per call)."""
    where = Path(tempfile.mkdtemp(dir=tmp_path))
    for name, text in texts.items():
        (where / f"{name}.config").write_text(text)
    return kconfig.resolve_fragments([str(where / f"{name}.config") for name in texts], where)


def test_fingerprint_follows_what_is_asked_not_how_it_is_written(tmp_path):
    base = kconfig.fingerprint(_frags(tmp_path, one="CONFIG_X=y\nCONFIG_Y=m\n"))
    # a comment, another order, the same request split across two fragments: the same kernel
    assert kconfig.fingerprint(_frags(tmp_path, one="# why\nCONFIG_Y=m\n\nCONFIG_X=y\n")) == base
    assert kconfig.fingerprint(_frags(tmp_path, a="CONFIG_X=y\n", b="# loop\nCONFIG_Y=m\n")) == base
    # a value that changes, an option added or overridden by a later fragment: another kernel
    assert kconfig.fingerprint(_frags(tmp_path, one="CONFIG_X=y\nCONFIG_Y=y\n")) != base
    assert kconfig.fingerprint(_frags(tmp_path, one="CONFIG_X=y\nCONFIG_Y=m\nCONFIG_Z=y\n")) != base
    assert kconfig.fingerprint(_frags(tmp_path, a="CONFIG_X=y\nCONFIG_Y=m\n",
                                      b="# CONFIG_X is not set\n")) != base


@pytest.fixture(scope="module")
def kernel_tree():
    """The real pristine tree (Debian linux-source package, installed by setup.sh)."""
    return pipeline.get_tree(load())


def test_real_merge_keeps_base_fragment(kernel_tree, tmp_path):
    frags = kconfig.resolve_fragments(["base"], KCONFIG_DIR)
    before = sorted(os.listdir(kernel_tree.path))
    cfg = kconfig.make_config(kernel_tree.path, tmp_path / "obj", frags, make_args=["-j2"],
                              log=tmp_path / "log")
    assert "CONFIG_OVERLAY_FS=m" in cfg.read_text()
    assert sorted(os.listdir(kernel_tree.path)) == before, "the source tree must not be written to"


def test_real_merge_keeps_bench_virtme_fragment(kernel_tree, tmp_path):
    """`invoke bench`'s virtme-ng kernel: base + bench-virtme survives olddefconfig, option by option."""
    s = load()
    frags = kconfig.resolve_fragments([*s.fragments, s.bench_virtme_fragment], KCONFIG_DIR)
    cfg = kconfig.make_config(kernel_tree.path, tmp_path / "obj", frags, make_args=["-j2"],
                              log=tmp_path / "log")
    text = cfg.read_text()
    assert "CONFIG_9P_FS=y" in text and "CONFIG_VIRTIO_CONSOLE=y" in text
    assert "CONFIG_OVERLAY_FS=y" in text, "virtme-ng's init mounts overlays before modules could load"


def test_real_merge_names_dropped_option(kernel_tree, tmp_path):
    frag = tmp_path / "broken.config"
    # DM_FLAKEY depends on BLK_DEV_DM, which allnoconfig leaves off.
    frag.write_text("CONFIG_MD=y\n# CONFIG_BLK_DEV_DM is not set\nCONFIG_DM_FLAKEY=y\nCONFIG_64BIT=y\n")
    frags = kconfig.resolve_fragments([str(frag)], tmp_path)
    with pytest.raises(errors.ConfigOptionsDropped) as exc:
        kconfig.make_config(kernel_tree.path, tmp_path / "obj", frags, make_args=["-j2"],
                            log=tmp_path / "log")
    assert "CONFIG_DM_FLAKEY=y (got not set)" in str(exc.value)
    assert "CONFIG_64BIT" not in str(exc.value)


def test_a_kept_config_is_validated_again_after_kbuild_resyncs_it(tmp_path, monkeypatch):
    """The devloop keeps .config when the fragments are unchanged; a Kconfig edit in the
    tree makes kbuild re-sync it during make, silently.  An option it dropped is named."""
    from vm.kernel import build

    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_OVERLAY_FS=m\nCONFIG_DM_FLAKEY=y\n")
    frags = kconfig.resolve_fragments([str(frag)], tmp_path)
    obj = tmp_path / "obj"
    (obj / "include" / "config").mkdir(parents=True)
    (obj / "include" / "config" / "kernel.release").write_text("7.2.13\n")
    (obj / ".config").write_text("CONFIG_OVERLAY_FS=m\nCONFIG_DM_FLAKEY=y\n")

    def make_resyncs(src, obj_, targets, tc, log, label, extra=()):
        (obj_ / ".config").write_text("CONFIG_OVERLAY_FS=m\n# CONFIG_DM_FLAKEY is not set\n")

    monkeypatch.setattr(build, "_make", make_resyncs)
    tc = build.Toolchain(jobs=1, ccache_dir=None, cache_root=tmp_path)
    with pytest.raises(errors.ConfigOptionsDropped, match=r"re-synced .*CONFIG_DM_FLAKEY=y \(got not set\)"):
        build.compile_tree(tmp_path / "src", obj, frags, tc, tmp_path / "log", "devloop-patched",
                           reconfigure=False)
    monkeypatch.setattr(build, "_make", lambda *a, **k: None)
    (obj / ".config").write_text("CONFIG_OVERLAY_FS=m\nCONFIG_DM_FLAKEY=y\n")
    assert build.compile_tree(tmp_path / "src", obj, frags, tc, tmp_path / "log", "devloop-patched",
                              reconfigure=False)[1] == "7.2.13"
