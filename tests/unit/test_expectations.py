"""The expectations table (tests/scenarios/expectations.json) and the step checker."""

import base64
import importlib.util
from pathlib import Path

import pytest

from tests.fakes import FakeConnection
from vm import errors
from vm.settings import load
from vm.suites import scenario
from vm.suites.scenario import Expectations, Outcome, RowRun

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "tests" / "scenarios" / "expectations.json"
#: ../shared/SCENARIOS.md beside the checkout, else where ovl.shared_dirs says (a clone elsewhere, e.g. CI's)
SCENARIOS_MD = [ROOT / d / "SCENARIOS.md" for d in load().shared_dirs]
VARIANTS = ["baseline", "prefix-1", "prefix-2", "prefix-3", "patched"]


@pytest.fixture(scope="module")
def table() -> Expectations:
    return Expectations.load(TABLE)


@pytest.fixture(scope="module")
def contract(missing_input) -> list[scenario.ContractRow]:
    """The rows of SCENARIOS.md's behaviour table (the contract the table follows)."""
    path = next((p for p in SCENARIOS_MD if p.is_file()), None)
    if path is None:
        missing_input(f"SCENARIOS.md (looked in {', '.join(map(str, SCENARIOS_MD))})",
                      "check out the shared directory next to the repository")
    rows = scenario.parse_scenarios_table(path.read_text())
    assert len(rows) >= 10, f"could not parse the behaviour table of {path}: {rows}"
    return rows


def test_table_covers_every_row_of_scenarios_md(table, contract):
    assert table.contract_row_ids == [r.id for r in contract], \
        "rows of expectations.json must be SCENARIOS.md's, in its order"


def test_every_row_is_a_contract_row_or_a_declared_extra_row(table, contract):
    ids = table.row_ids
    assert len(ids) == len(set(ids)), "no row twice"
    contract_ids = [r.id for r in contract]
    assert not set(table.extra_row_ids) & set(contract_ids), "an extra row must not be a SCENARIOS.md row"
    assert ids == contract_ids + table.extra_row_ids, "SCENARIOS.md's rows first, then the extra ones"
    for row in table.extra_row_ids:
        assert table.extra_rows[row].strip(), f"{row}: an extra row says where it comes from"


def test_the_extra_rows_of_the_review():
    raw = Expectations.load(TABLE).data["extra_rows"]
    assert list(raw) == ["workdir-in-use", "work-reset"]
    for spec in raw.values():
        assert spec["why"].startswith("series v3 review") and spec["steps"]


@pytest.mark.parametrize("label", VARIANTS + [v + "-debug" for v in VARIANTS])
def test_every_variant_has_an_expectation_for_every_row(table, label):
    for row in table.row_ids:
        exp = table.get(row, label)
        assert exp.steps and exp.headline in scenario.OUTCOMES


def test_unknown_variant_is_an_error(table):
    with pytest.raises(errors.ExpectationError, match="no expectations for kernel variant"):
        table.get("fresh-volatile", "prefix-9")


def test_both_filesystems(table):
    assert table.filesystems == ("ext4", "xfs")


def test_patch_level_expectations(table):
    for row in table.row_ids:
        base = table.get(row, "baseline").steps
        assert table.get(row, "prefix-1").steps == base, f"{row}: prefix-1 must behave as B"
        assert table.get(row, "prefix-2").steps == base, f"{row}: prefix-2 must behave as B"
        patched = table.get(row, "patched")
        prefix3 = table.get(row, "prefix-3")
        if row == "wb-error-seen":
            assert patched.headline == "EINVAL" and prefix3.headline == "OK", \
                "without patch 4 wb-error-seen comes out OK: the hole patch 4 closes"
        else:
            assert prefix3.steps == patched.steps, f"{row}: prefix-3 must behave as P"


def test_headlines_match_scenarios_md(table, contract):
    # the outcome of each row's deciding (last) step, as the P and B cells state it
    wrong = []
    for row in contract:
        p = scenario.cell_outcome(row.p)
        b = scenario.cell_outcome(row.b, same=p)
        for variant, cell, want in (("patched", row.p, p), ("baseline", row.b, b)):
            got = table.get(row.id, variant).headline
            if got != want:
                wrong.append(f"{row.id}/{variant}: expectations.json ends in {got}, "
                             f"SCENARIOS.md says {cell!r}")
    assert not wrong, "; ".join(wrong)


@pytest.mark.parametrize("cell,same,expected", [
    ("OK; `work/incompat/volatile/dirty` exists; checkpoint xattr present on `work/incompat/volatile`",
     None, "OK"),
    ("OK; files intact; dirty file still there", None, "OK"),
    ("EINVAL (instance id changed)", None, "EINVAL"),
    ('EIO (upstream "unseen error" check)', None, "EIO"),
    ("EIO", None, "EIO"),
    ("fsync fails both times, syncfs EIO", None, "EIO"),
    ("same", "EIO", "EIO"),
    ("first remount EINVAL", None, "EINVAL"),
    ("OK each time", None, "OK"),
    ("ENOENT", None, "ENOENT"),           # an errno the table lacks still maps, then mismatches
], ids=["ok-then-detail", "ok-files", "einval-why", "eio-quoted", "eio", "fsync-syncfs", "same",
        "first-remount", "ok-each-time", "other-errno"])
def test_cell_outcome(cell, same, expected):
    assert scenario.cell_outcome(cell, same=same) == expected


@pytest.mark.parametrize("cell,match", [
    ("fails", "names no outcome"),
    ("OK, then EIO", r"names several outcomes \(EIO, OK\)"),
    ("same", "'same' with no P outcome"),
], ids=["none", "several", "same-without-p"])
def test_cell_outcome_rejects_unclear_cells(cell, match):
    with pytest.raises(errors.ExpectationError, match=match):
        scenario.cell_outcome(cell)


def test_failing_mounts_name_their_log_line(table):
    for row in table.row_ids:
        for variant in ("baseline", "patched", "prefix-3"):
            for step in table.get(row, variant).steps:
                if step.step.startswith(("mount", "remount")) and step.expect != "OK":
                    assert step.log, f"{row}/{variant}/{step.step}"
                    if variant == "baseline":
                        assert step.log[0] in (scenario.INCOMPAT_MSG, scenario.UNSEEN_MSG)
                    elif step.expect == "EINVAL":
                        assert step.log[0].startswith("volatile reuse refused: "), \
                            f"{row}: P names the check that refused"


def test_every_row_has_a_scenario(table):
    spec = importlib.util.spec_from_file_location(
        "scenario_rows", ROOT / "tests" / "scenarios" / "test_scenarios.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(module.ROWS) == sorted(table.row_ids), \
        "ROWS in test_scenarios.py implements exactly the table's rows (SCENARIOS.md's and the extra ones)"


def test_bad_table_is_rejected():
    data = {"variants": {"baseline": {"behaves_as": "B"}},
            "rows": {"r": {"B": [{"step": "remount volatile", "expect": "EINVAL"}]}}}
    with pytest.raises(errors.ExpectationError, match="must name the kernel log line"):
        Expectations(data)
    data["rows"]["r"]["B"][0].update(expect="ENOENT", log=["x"])
    with pytest.raises(errors.ExpectationError, match="is not one of"):
        Expectations(data)
    data["rows"]["r"] = {"P": [{"step": "mount volatile", "expect": "OK"}]}
    with pytest.raises(errors.ExpectationError, match="has no 'B' column"):
        Expectations(data)


def _extra(**row) -> dict:
    return {"variants": {"baseline": {"behaves_as": "B"}},
            "rows": {"a": {"B": [{"step": "mount volatile", "expect": "OK"}]}},
            "extra_rows": {"x": {"B": [{"step": "mount volatile", "expect": "OK"}], **row}}}


def test_an_extra_row_is_declared_with_its_reason():
    table = Expectations(_extra(why=" review  finding 1:\n in use ", steps="mount twice"))
    assert table.row_ids == ["a", "x"] and table.contract_row_ids == ["a"]
    assert table.extra_rows == {"x": "review finding 1: in use"}
    assert set(table.rows["x"]) == {"B"}       # why and steps are text, not columns
    assert table.get("x", "baseline").headline == "OK"


@pytest.mark.parametrize("row,match", [
    ({}, 'needs a non-empty "why"'),
    ({"why": "  "}, 'needs a non-empty "why"'),
    ({"why": ["a list"]}, 'needs a non-empty "why"'),
], ids=["no-why", "blank-why", "not-text"])
def test_an_extra_row_without_a_reason_is_rejected(row, match):
    with pytest.raises(errors.ExpectationError, match=match):
        Expectations(_extra(**row))


def test_a_row_is_declared_once(tmp_path):
    data = _extra(why="w")
    data["extra_rows"]["a"] = data["extra_rows"].pop("x")
    with pytest.raises(errors.ExpectationError, match="'a' is already a row of SCENARIOS.md"):
        Expectations(data)
    twice = tmp_path / "t.json"
    twice.write_text('{"variants": {"baseline": {"behaves_as": "B"}}, "rows": {'
                     '"a": {"B": [{"step": "mount volatile", "expect": "OK"}]},'
                     '"a": {"B": [{"step": "mount plain", "expect": "OK"}]}}}')
    with pytest.raises(errors.ExpectationError, match="'a' given twice in one object"):
        Expectations.load(twice)


# --- RowRun ----------------------------------------------------------------------------

def _run(table, row="volatile-to-volatile", variant="patched", fs="xfs", checks=None):
    return RowRun(table.get(row, variant), fs, checks or {"files": lambda: None,
                                                        "dirty": lambda: None,
                                                        "checkpoint": lambda: None})


EINVAL = Outcome(22, "errno=22 EINVAL: Invalid argument")


def test_rowrun_passes_the_expected_steps(table):
    run = _run(table)
    run.step("mount volatile", scenario.OK)
    run.step("remount volatile", scenario.OK)
    run.finish()
    assert [(r.step, r.actual, r.ok) for r in run.results] == [
        ("mount volatile", "OK", True), ("remount volatile", "OK", True)]
    assert run.actual_headline == "OK"


def test_rowrun_names_the_broken_expectation(table):
    run = _run(table)
    run.step("mount volatile", scenario.OK)
    log = ["[1.0] overlayfs: volatile reuse refused: instance id changed, upper fs was unmounted",
           "[1.0] overlayfs: overlay with incompat feature 'volatile' cannot be mounted"]
    with pytest.raises(errors.ExpectationFailed) as err:
        run.step("remount volatile", EINVAL, log)
    text = str(err.value)
    assert text.startswith("volatile-to-volatile[xfs-patched]: remount volatile returned EINVAL, "
                           "expected OK (log: ")
    assert "instance id changed" in text
    assert run.actual_headline == "EINVAL" and run.failure == text


def test_rowrun_requires_the_log_line(table):
    run = _run(table, "upper-remounted")
    run.step("mount volatile", scenario.OK)
    with pytest.raises(errors.ExpectationFailed, match="the kernel log lacks 'volatile reuse refused: "
                                                "instance id changed'"):
        run.step("remount volatile", EINVAL, ["overlayfs: overlay with incompat feature "
                                              "'volatile' cannot be mounted"])
    run = _run(table, "upper-remounted")
    run.step("mount volatile", scenario.OK)
    run.step("remount volatile", EINVAL,
             ["[2.5] overlayfs: volatile reuse refused: instance id changed, upper fs was unmounted"])
    run.finish()


def test_rowrun_runs_the_checks_the_table_asks_for(table):
    called = []
    run = _run(table, "fresh-volatile", checks={
        "dirty": lambda: called.append("dirty"),
        "checkpoint": lambda: "trusted.overlay.volatile is not set on work/incompat/volatile"})
    with pytest.raises(errors.ExpectationFailed, match="returned OK as expected, but trusted.overlay.volatile "
                                                "is not set"):
        run.step("mount volatile", scenario.OK)
    assert called == ["dirty"]


def test_rowrun_reports_missing_and_unexpected_steps(table):
    run = _run(table)
    run.step("mount volatile", scenario.OK)
    with pytest.raises(errors.ExpectationFailed, match="ended before the table's steps remount volatile"):
        run.finish()
    run = _run(table)
    with pytest.raises(errors.ExpectationFailed, match="ran step 'remount plain' where the table expects "
                                                "'mount volatile'"):
        run.step("remount plain", scenario.OK)
    run = _run(table, "fresh-volatile")
    run.step("mount volatile", scenario.OK)
    with pytest.raises(errors.ExpectationFailed, match="expects no step after"):
        run.step("remount volatile", scenario.OK)


def test_debug_variant_label(table):
    run = _run(table, variant="patched-debug", fs="ext4")
    assert run.label == "volatile-to-volatile[ext4-patched-debug]"


# --- small parsers ----------------------------------------------------------------------

def test_parse_scenarios_md():
    text = ("intro\n\n| id | steps | P | B |\n|----|-------|---|---|\n"
            "| fresh-volatile | mount | OK | OK |\n| `x-y` | a \\| b | EIO | EIO |\n\nafter\n"
            "| other | table |\n")
    assert scenario.parse_scenarios_md(text) == ["fresh-volatile", "x-y"]
    rows = scenario.parse_scenarios_table(text)
    assert [(r.id, r.steps, r.p, r.b) for r in rows] == [("fresh-volatile", "mount", "OK", "OK"),
                                                         ("x-y", "a | b", "EIO", "EIO")]
    with pytest.raises(errors.ExpectationError, match="has no P/B column"):
        scenario.parse_scenarios_table("| id | steps |\n|--|--|\n| a | b |\n")


def test_parse_getfattr():
    out = ("# file: /mnt/upperfs/work/work/incompat/volatile\n"
           "trusted.overlay.volatile=0x0102ff\n"
           'user.text="abc"\nuser.empty\n\n')
    assert scenario.parse_getfattr(out) == {"trusted.overlay.volatile": b"\x01\x02\xff",
                                            "user.text": b"abc", "user.empty": b""}


def test_fs_damage_spots_journal_abort_and_shutdown_only():
    lines = ["EXT4-fs warning (device dm-0): ext4_end_bio:353: I/O error 10 writing to inode 14",
             "Buffer I/O error on device dm-0, logical block 33024",
             "dm-0: writeback error on inode 524419, offset 0, sector 524480",
             "Aborting journal on device dm-0-8.",
             "XFS (dm-0): log I/O error -5",
             "XFS (dm-0): Filesystem has been shut down due to log error (0x2)."]
    assert scenario.fs_damage(lines) == lines[3:]


# --- step helpers the suite uses ----------------------------------------------------------

def test_new_upper_mounts_with_the_suite_options():
    fake = FakeConnection()
    scenario.new_upper(fake, "/dev/mapper/ovl-flakey", "ext4", scenario.OverlayDirs())
    assert "mkfs.ext4 -q -F /dev/mapper/ovl-flakey" in fake.calls
    mounts = [c for c in fake.calls if "exec mount" in c]
    assert len(mounts) == 1
    assert mounts[0].endswith("-t ext4 -o lazytime,noinit_itable /dev/mapper/ovl-flakey /mnt/upperfs")


def test_injection_helpers_send_the_exact_commands():
    fake = FakeConnection()
    fake.expect("/usr/local/bin/ovl-syscall sync_file_range", 1, "errno=5 EIO: Input/output error\n")
    scenario.pwrite(fake, "/mnt/ovl/victim", "1m", 0x11, create=True)
    scenario.quiesce(fake, "/mnt/upperfs")
    scenario.pwrite(fake, "/mnt/ovl/victim", "1m", 0x22)
    assert scenario.force_writeback(fake, "/mnt/upperfs/upper/victim") == "EIO"
    assert fake.calls == [
        "xfs_io -f -c 'pwrite -q -S 0x11 0 1m' /mnt/ovl/victim",
        "fsfreeze --freeze /mnt/upperfs",
        "fsfreeze --unfreeze /mnt/upperfs",
        "xfs_io -c 'pwrite -q -S 0x22 0 1m' /mnt/ovl/victim",
        "/usr/local/bin/ovl-syscall sync_file_range /mnt/upperfs/upper/victim",
    ]


def test_checkpoint_reads_the_trusted_xattr():
    fake = FakeConnection()
    fake.expect("getfattr", 0, "# file: /mnt/upperfs/work/work/incompat/volatile\n"
                               "trusted.overlay.volatile=0x00112233\n")
    assert scenario.checkpoint(fake, scenario.OverlayDirs()) == bytes.fromhex("00112233")
    assert fake.calls[-1] == ("getfattr --absolute-names -d -m - -e hex "
                              "/mnt/upperfs/work/work/incompat/volatile")
    fake = FakeConnection()
    fake.expect("test -e", 1)
    assert scenario.checkpoint(fake, scenario.OverlayDirs()) is None


# --- POSIX ACLs as raw xattrs -----------------------------------------------------------

def test_posix_acl_xattr_is_the_kernel_format():
    # u::rw-,g::r--,o::r--: what getfattr prints for a file setfacl gave that ACL
    minimal = scenario.posix_acl_xattr([(scenario.ACL_USER_OBJ, 6, None), (scenario.ACL_GROUP_OBJ, 4, None),
                                        (scenario.ACL_OTHER, 4, None)])
    assert base64.b64encode(minimal) == b"AgAAAAEABgD/////BAAEAP////8gAAQA/////w=="
    assert scenario.posix_acl_xattr(scenario.EXTENDED_ACL) == bytes.fromhex(
        "02000000" "01000700ffffffff" "02000500feff0000" "04000500ffffffff" "10000500ffffffff"
        "20000500ffffffff")


@pytest.mark.parametrize("entry,match", [
    ((0x40, 7, None), "not a POSIX ACL entry"),
    ((scenario.ACL_OTHER, 8, None), "not a POSIX ACL entry"),
    ((scenario.ACL_USER_OBJ, 7, 0), "only named user/group entries carry an id"),
    ((scenario.ACL_GROUP, 5, None), "only named user/group entries carry an id"),
], ids=["tag", "perm", "id-on-user-obj", "no-id-on-group"])
def test_posix_acl_xattr_rejects_bad_entries(entry, match):
    with pytest.raises(ValueError, match=match):
        scenario.posix_acl_xattr([entry])


def test_change_dir_like_a_user_sends_the_exact_commands():
    fake = FakeConnection()
    scenario.change_dir_like_a_user(fake, "/mnt/upperfs/work/work")
    value = "0s" + base64.b64encode(scenario.posix_acl_xattr(scenario.EXTENDED_ACL)).decode()
    assert fake.calls == [
        "chmod 0755 -- /mnt/upperfs/work/work",
        f"setfattr -n system.posix_acl_default -v {value} -- /mnt/upperfs/work/work",
        f"setfattr -n system.posix_acl_access -v {value} -- /mnt/upperfs/work/work",
    ]


def test_mode_and_acls_of_a_dir():
    fake = FakeConnection()
    fake.expect("stat -c %a -- /d", 0, "0\n")
    fake.expect("getfattr", 0, "# file: /d\nsystem.posix_acl_access=0x0200\nsecurity.selinux=0x00\n")
    assert scenario.mode_of(fake, "/d") == "0"
    assert scenario.acls_of(fake, "/d") == ["system.posix_acl_access"]
    assert fake.calls[-1] == "getfattr --absolute-names -d -m - -e hex /d"


# --- per-base differences (tests/scenarios/bases/<base>.json) ---------------------------

BASES = ROOT / "tests" / "scenarios" / "bases"


def test_base_files_load_and_name_their_base():
    table = Expectations.load(TABLE, BASES)
    assert {"6.1", "6.12"} <= set(table.bases)
    for base in ("6.1", "6.12"):
        for row in table.row_ids:
            assert table.get(row, f"patched@{base}").steps


@pytest.mark.parametrize("label,base,expected", [
    ("patched", "6.1", "B"),                # the difference applies on 6.1 ...
    ("patched@6.1", None, "B"),             # ... named by the variant
    ("patched-debug@6.1", None, "B"),
    ("patched", "6.12", "P"),               # ... and nowhere else
    ("patched", None, "P"),
    ("baseline", "6.1", "B"),
], ids=["base-arg", "base-in-variant", "debug", "other-base", "no-base", "other-variant"])
def test_a_base_difference_overrides_the_table(label, base, expected):
    data = Expectations.load(TABLE).data
    bases = {"6.1": {"base": "6.1", "differences": {
        "patched": {"volatile-to-volatile": {"behaves_as": "B", "why": "say why"}}}}}
    table = Expectations(data, "t", bases)
    assert table.behaviour_of("volatile-to-volatile", label, base) == expected


@pytest.mark.parametrize("diff,match", [
    ({"behaves_as": "B"}, "non-empty why"),
    ({"behaves_as": "B", "why": " "}, "non-empty why"),
    ({"behaves_as": "Q", "why": "x"}, "has no 'Q' column"),
], ids=["no-why", "blank-why", "unknown-column"])
def test_base_differences_are_validated(diff, match):
    data = Expectations.load(TABLE).data
    with pytest.raises(errors.ExpectationError, match=match):
        Expectations(data, "t", {"6.1": {"base": "6.1", "differences": {"patched": {"fresh-volatile": diff}}}})


def test_variant_and_version_helpers():
    assert scenario.base_variant("prefix-3-debug@6.1") == "prefix-3"
    assert scenario.variant_base("prefix-3-debug@6.1") == "6.1"
    assert scenario.variant_base("patched") is None
    assert scenario.base_of_version("6.1.192") == "6.1"
    assert scenario.base_of_version("6.12.117") == "6.12"
