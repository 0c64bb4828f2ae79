"""Review finding 2's judge (vm/suites/bootrng.py), on traces saved from real boots.

tests/data/rng/fixed.trace: the boot-id kernel of the series (7.2, overlayfs
built in); old.trace: the same kernel with the series before the fix
(git show f52146b:patches/7.2), which made the boot id in ovl_init().
"""

from pathlib import Path

import pytest

from vm.suites import bootrng

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data" / "rng"


def test_cmdline_distrusts_cpu_and_bootloader_and_sets_up_both_probes():
    assert "random.trust_cpu=off" in bootrng.CMDLINE and "random.trust_bootloader=off" in bootrng.CMDLINE
    probes = next(a for a in bootrng.CMDLINE if a.startswith("kprobe_event="))
    assert " " not in probes and probes.count(";") == 1
    assert ",ovl_init," in probes and ",uuid_gen," in probes


def test_the_fixed_series_makes_the_boot_id_after_the_crng_is_ready():
    hits = bootrng.parse_trace((DATA / "fixed.trace").read_text())
    init = [h for h in hits if h.event == "init"]
    made = [h for h in hits if h.event == "uuid" and h.from_overlay]
    assert len(init) == 1 and init[0].crng < bootrng.CRNG_READY      # the positive control
    # the boot id (ovl_get_boot_id) and the overlay's own uuid (ovl_init_uuid_xattr), at mount time
    assert sorted(h.caller.split("+")[0] for h in made) == ["ovl_get_boot_id", "ovl_init_uuid_xattr"]
    assert all(h.crng == bootrng.CRNG_READY for h in made)
    assert bootrng.problems(hits) == []


def test_the_series_before_the_fix_is_caught():
    hits = bootrng.parse_trace((DATA / "old.trace").read_text())
    found = bootrng.problems(hits)
    assert len(found) == 1 and found[0].startswith("boot id made from an unseeded RNG: uuid_gen() uuid_gen from ovl_init+")


def _hit(event, crng, caller=""):
    return bootrng.Hit(event, f"{'ovl_init' if event == 'init' else 'uuid_gen'}+0x0/0x20", caller, crng, 1.0)


@pytest.mark.parametrize("hits, expected", [
    ([], ["no ovl_init() event", "no uuid_gen() call from overlayfs"]),
    ([_hit("init", 2), _hit("uuid", 2, "ovl_get_boot_id+0x4a/0xb0")], ["ran with the crng already ready"]),
    ([_hit("init", 0), _hit("uuid", 2, "ext4_fill_super+0x1/0x2")], ["no uuid_gen() call from overlayfs"]),
    ([_hit("init", 0), _hit("uuid", 1, "ovl_get_boot_id+0x4a/0xb0")], ["boot id made from an unseeded RNG"]),
    ([_hit("init", 1), _hit("uuid", 2, "ovl_get_boot_id+0x4a/0xb0")], []),
], ids=["no-events", "rng-seeded-too-early-to-tell", "not-from-overlay", "unseeded", "ok"])
def test_problems(hits, expected):
    found = bootrng.problems(hits)
    assert len(found) == len(expected)
    assert all(e in f for e, f in zip(expected, found))


def test_parse_skips_comments_other_events_and_lines_without_crng():
    text = ("# tracer: nop\n#\n"
            "   swapper/0-1   [001] .....   0.512345: init: (ovl_init+0x0/0x120) crng=0\n"
            "   mount-212     [000] .....  12.000001: other: (foo+0x0/0x1) crng=2\n"
            "   mount-212     [000] .....  12.000002: uuid: (uuid_gen+0x0/0x20)\n")
    assert bootrng.parse_trace(text) == [bootrng.Hit("init", "ovl_init+0x0/0x120", "", 0, 0.512345)]
