"""`invoke bench` without a VM: stats, the table, bench.json, the selection, what the
measurements parse (retest lines, console timestamps, SSH timing files, JUnit times), the
command lines of the bare QEMU floor and virtme-ng, and the small real pieces (a command
watched until a line, the SSH timing hook, a touch that leaves other hard links alone)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vm import bench, benchmain, benchrun, benchsuite, errors, runner
from vm.machine import qemu, ssh
from vm.settings import load

pytestmark = pytest.mark.unit

TCG = qemu.Accel("tcg", "test", qemu.TCG_FACTOR)
KVM = qemu.Accel("kvm", "test", qemu.KVM_FACTOR)


# --- stats, goals, rows, table, json ---------------------------------------------------

def test_stats_min_median_max():
    assert bench.Stats.of([3.0, 1.0, 2.0]) == bench.Stats(1.0, 2.0, 3.0, 3)
    assert bench.Stats.of([4.0, 1.0, 2.0, 3.0]).median == 2.5
    with pytest.raises(ValueError):
        bench.Stats.of([])


def test_goal_met_or_missed_by_how_much():
    goal = bench.Goal(1.7, "boot < 1.7s")
    assert goal.verdict(bench.Stats.of([1.5])).startswith("met (boot < 1.7s; 0.20s to spare")
    assert goal.verdict(bench.Stats.of([2.9, 3.0, 3.1])) == "missed by 1.30s (boot < 1.7s)"


def test_row_judged_by_its_goal_only_with_samples():
    measured = bench.Row(benchrun.BOOT, (2.0, 3.0, 4.0))
    assert measured.goal.startswith("missed by 1.30s")
    assert bench.Row(benchrun.BOOT).goal == ""
    assert bench.Row("no goal here", (1.0,)).goal == ""


def test_table_has_numbers_goal_and_why_not_run():
    rows = [bench.Row(benchrun.BOOT, (2.0, 3.0, 4.0), "SSH tries per boot: 1, 1, 1"),
            bench.not_run("edit-to-verdict: util.c, module reload", bench.NOT_RUN_EDIT + "\nsecond line")]
    text = bench.render(rows, 3)
    lines = text.splitlines()
    assert lines[0].startswith("| measurement (seconds, 3 runs) | min | median | max | n |")
    assert f"| {benchrun.BOOT} | 2.00 | 3.00 | 4.00 | 3 | missed by 1.30s" in lines[2]
    assert "SSH tries per boot: 1, 1, 1" in lines[2]
    assert lines[3] == f"| edit-to-verdict: util.c, module reload | - | - | - | 0 | {bench.NOT_RUN_EDIT} |"


def test_json_has_rows_stats_and_host(tmp_path):
    rows = [bench.Row("boot: x", (1.0, 2.0, 9.0)), bench.not_run("vng", "not run: no vng here")]
    host = bench.host_facts("tcg (KVM probe failed)", {"patched": "7.2.13"})
    path = bench.write_json(tmp_path / "r" / "bench.json", rows, host, 3)
    data = json.loads(path.read_text())
    assert data["repeat"] == 3
    assert data["host"]["cores"] == os.cpu_count() and data["host"]["accelerator"] == "tcg (KVM probe failed)"
    assert data["host"]["kernels"] == {"patched": "7.2.13"}
    run = data["rows"][0].pop("run")
    assert run["repeat"] == 3 and run["accelerator"] == "tcg (KVM probe failed)" and run["at"]
    assert data["rows"][0] == {"name": "boot: x", "samples": [1.0, 2.0, 9.0], "note": "",
                               "min": 1.0, "median": 2.0, "max": 9.0}
    assert data["rows"][1]["run"] == run
    assert {k: v for k, v in data["rows"][1].items() if k != "run"} == \
        {"name": "vng", "samples": [], "note": "not run: no vng here"}
    assert not list(path.parent.glob("*.tmp"))


def test_a_run_with_only_some_measurements_keeps_the_others_rows(tmp_path):
    """`invoke bench --only boot` after a whole run: the other rows stay, boot's is replaced,
    and each row still says which run (repeat, load) measured it."""
    path = tmp_path / "bench.json"
    first = bench.host_facts("tcg (first)", {})
    bench.write_json(path, [bench.Row("boot: x", (1.0,)), bench.Row("build: incremental", (5.0,))], first, 1)
    bench.write_json(path, [bench.Row("boot: x", (2.0, 3.0))], bench.host_facts("tcg (second)", {}), 2)
    data = json.loads(path.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["boot: x", "build: incremental"]
    assert rows["boot: x"]["samples"] == [2.0, 3.0] and rows["boot: x"]["run"]["repeat"] == 2
    assert rows["build: incremental"]["samples"] == [5.0]
    assert rows["build: incremental"]["run"]["repeat"] == 1
    assert rows["build: incremental"]["run"]["accelerator"] == "tcg (first)"
    assert data["repeat"] == 2 and data["host"]["accelerator"] == "tcg (second)"


def test_a_bench_json_of_another_shape_is_replaced(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text("[1, 2]\n")
    bench.write_json(path, [bench.Row("boot: x", (1.0,))], bench.host_facts("tcg", {}), 1)
    assert [r["name"] for r in json.loads(path.read_text())["rows"]] == ["boot: x"]


# --- selection ---------------------------------------------------------------------------

def test_select_defaults_to_all_but_cold():
    assert bench.select(None) == bench.MEASUREMENTS
    assert bench.COLD not in bench.select("")


def test_select_keeps_table_order_and_adds_cold():
    assert bench.select("suite, boot") == ("boot", "suite")
    assert bench.select("boot", cold=True) == ("cold", "boot")
    assert bench.select("cold") == ("cold",)


def test_select_rejects_unknown_names():
    with pytest.raises(errors.BadArgument, match="unknown measurement.*bogus.*fix: use --only"):
        bench.select("boot,bogus")


# --- what the measurements read --------------------------------------------------------

@pytest.mark.parametrize("mode", bench.RETEST_MODES)
def test_parse_retest_line(mode):
    out = f"==> build\nsome noise\nretest: {mode} (only fs/overlayfs/util.c changed: overlay.ko)\nPASSED\n"
    assert bench.parse_retest(out) == bench.Retest(mode, "only fs/overlayfs/util.c changed: overlay.ko")


@pytest.mark.parametrize("text", ["", "retest: teleport (why)", "retest: reboot", "not retest: reboot (x)"])
def test_parse_retest_rejects_missing_or_unknown(text):
    with pytest.raises(errors.BadArgument, match="no `retest: MODE"):
        bench.parse_retest(text)


def test_kernel_milestones_from_console_timestamps():
    lines = ["[    0.000000] Linux version 7.2.13", "[    0.701234] EXT4-fs (vda): mounted filesystem",
             "[    0.705000] VFS: Mounted root (ext4 filesystem) on device 254:0.",
             "[    0.731000] Run /sbin/ovl-init as init process", "ovl-init: guest ready: 7.2.13",
             "[    9.000000] VFS: Mounted root (again)"]
    assert bench.kernel_milestones(lines) == {"rootfs": 0.705, "init": 0.731}
    assert bench.kernel_milestones(["VFS: Mounted root (no timestamp)"]) == {}


@pytest.mark.parametrize(("sent", "phase"), [
    ("OVH_CMD_TAG=ab12; export OVH_CMD_TAG; exec mkfs.ext4 -q -F /dev/mapper/ovl", "mkfs"),
    ("OVH_CMD_TAG=ab12; export OVH_CMD_TAG; exec dmsetup create ovl --table '0 8 linear'", "dm-flakey"),
    ("OVH_CMD_TAG=ab12; export OVH_CMD_TAG; exec blockdev --getsz /dev/vdc", "dm-flakey"),
    ("OVH_CMD_TAG=ab12; export OVH_CMD_TAG; exec /usr/local/bin/ovl-syscall mount overlay /m", "mounts"),
    ("OVH_CMD_TAG=ab12; export OVH_CMD_TAG; exec sh -c 'while mountpoint -q \"$1\"; do umount' sh /m", "mounts"),
    ("OVH_CMD_TAG=ab12; export OVH_CMD_TAG; exec getfattr -d /u", "other"),
    ("connect", "connect"),
])
def test_phase_of_guest_commands(sent, phase):
    assert bench.phase_of(sent) == phase


def _timing(*entries) -> list[str]:
    return [json.dumps({"what": w, "seconds": s, "test": t}) for w, s, t in entries]


def test_breakdowns_per_test_and_phase_without_the_boot():
    row = "tests/scenarios/test_scenarios.py::test_row[volatile-to-volatile-ext4-patched]"
    other = "tests/scenarios/test_scenarios.py::test_row[fresh-volatile-ext4-patched]"
    lines = _timing(("connect", 0.3, f"{row} (setup)"), ("true", 0.1, f"{row} (setup)"),
                    ("boot", 4.0, f"{row} (setup)"),
                    ("exec mkfs.ext4 -q -F /dev/x", 0.5, f"{row} (setup)"),
                    ("exec dmsetup create x", 0.2, f"{row} (setup)"),
                    ("exec ovl-syscall mount overlay", 0.1, f"{row} (call)"),
                    ("exec ovl-syscall mount overlay", 0.1, f"{row} (call)"),
                    ("exec getfattr -d /u", 0.05, f"{row} (teardown)"),
                    ("exec mkfs.xfs -q -f /dev/x", 0.7, f"{other} (setup)"))
    parts = bench.breakdowns(lines + [""])
    mine = parts["test_row[volatile-to-volatile-ext4-patched]"]
    assert mine.boot == 4.0
    assert mine.seconds == pytest.approx({"mkfs": 0.5, "dm-flakey": 0.2, "mounts": 0.2, "other": 0.05})
    assert mine.count == {"mkfs": 1, "dm-flakey": 1, "mounts": 2, "other": 1}
    assert mine.round_trips == 5 and mine.ssh_seconds == pytest.approx(0.95)
    assert parts["test_row[fresh-volatile-ext4-patched]"].boot == 0.0


def test_a_reboot_during_the_test_is_a_phase_not_a_fresh_start():
    row = "t.py::test_row[rebooted-ext4-patched]"
    parts = bench.breakdowns(_timing(("exec mkfs.ext4 /d", 0.5, f"{row} (setup)"),
                                     ("boot", 3.0, f"{row} (call)")))
    got = parts["test_row[rebooted-ext4-patched]"]
    assert got.boot == 0.0 and got.seconds == {"mkfs": 0.5, "reboot": 3.0} and got.round_trips == 1


def test_case_times_from_junit(tmp_path):
    xml = tmp_path / "s.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="test_row[a-ext4-patched]" time="5.5"/>'
                   '<testcase name="test_row[b-xfs-patched]" time="1.25"><failure message="x"/></testcase>'
                   '</testsuite></testsuites>')
    assert bench.case_times(xml) == {"test_row[a-ext4-patched]": 5.5, "test_row[b-xfs-patched]": 1.25}


# --- the boots the harness is compared with ---------------------------------------------

def test_bare_argv_has_no_disk_no_network_and_exits_on_panic():
    argv = bench.bare_argv(qemu.X86_64, TCG, Path("/k/bzImage"), 2048, 2)
    assert argv[0] == "qemu-system-x86_64"
    assert not {"-drive", "-netdev", "-device"} & set(argv)
    assert "-no-reboot" in argv and argv[argv.index("-kernel") + 1] == "/k/bzImage"
    append = argv[argv.index("-append") + 1]
    assert "panic=-1" in append and "console=ttyS0" in append and "root=" not in append
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi" and argv[argv.index("-m") + 1] == "2048"
    assert argv[-2:] == ["-serial", "stdio"]
    assert bench.bare_argv(qemu.X86_64, KVM, Path("/k"), 512, 1)[8:12] == ["-accel", "kvm", "-cpu", "host"]


def test_vng_argv_runs_one_command_without_kvm_under_tcg():
    argv = bench.vng_argv(Path("/v/bin/vng"), Path("/k/bzImage"), TCG, 2048, 2)
    assert argv[:4] == ["/v/bin/vng", "--run", "/k/bzImage", "--disable-kvm"]
    assert argv[argv.index("--exec") + 1] == f"echo {bench.VNG_MARKER}"
    assert argv[argv.index("--memory") + 1] == "2048M" and argv[argv.index("--cpus") + 1] == "2"
    assert "--verbose" in argv, "without udevd the command's output is on the console only"
    assert "--disable-kvm" not in bench.vng_argv(Path("vng"), Path("k"), KVM, 1024, 1)


# --- real small pieces -------------------------------------------------------------------

def test_run_until_stops_at_the_line(tmp_path):
    start = time.monotonic()
    seen = runner.run_until(["sh", "-c", "echo boot; echo 'VFS: Unable to mount root fs'; sleep 30"],
                            tmp_path / "log", lambda line: bench.BARE_MARKER in line, timeout=20)
    assert seen.seconds is not None and seen.seconds < 5 and time.monotonic() - start < 10
    assert seen.line == "VFS: Unable to mount root fs" and seen.returncode is None
    assert (tmp_path / "log").read_text().splitlines() == ["boot", "VFS: Unable to mount root fs"]


def test_run_until_reports_an_exit_without_the_line(tmp_path):
    seen = runner.run_until(["sh", "-c", "echo nope; exit 3"], tmp_path / "log", lambda line: "x" in line,
                            timeout=20)
    assert seen.seconds is None and seen.returncode == 3 and seen.tail == "nope"


def test_run_until_gives_up_at_the_timeout(tmp_path):
    start = time.monotonic()
    seen = runner.run_until(["sh", "-c", "echo slow; sleep 30"], tmp_path / "log", lambda line: False,
                            timeout=0.5)
    assert seen.seconds is None and time.monotonic() - start < 8


def test_ssh_timing_hook_writes_only_when_asked(tmp_path, monkeypatch):
    target = tmp_path / "timing.jsonl"
    monkeypatch.delenv(ssh.TIMING_VAR, raising=False)
    ssh.record_timing("exec true", 0.5)
    assert not target.exists()
    monkeypatch.setenv(ssh.TIMING_VAR, str(target))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "t.py::test_row[x] (call)")
    ssh.record_timing("exec true", 0.25)
    assert json.loads(target.read_text()) == {"what": "exec true", "seconds": 0.25,
                                              "test": "t.py::test_row[x] (call)"}


def test_touch_leaves_other_hard_links_alone(tmp_path):
    pristine = tmp_path / "pristine.c"
    pristine.write_text("int x;\n")
    os.utime(pristine, (1_000_000, 1_000_000))
    linked = tmp_path / "util.c"
    os.link(pristine, linked)
    benchrun.touch(linked)
    assert linked.read_text() == "int x;\n" and linked.stat().st_mtime > 1_000_000
    assert pristine.stat().st_mtime == 1_000_000 and pristine.stat().st_nlink == 1


def test_virtme_settings_add_the_fragment_once():
    s = load()
    once = benchrun.virtme_settings(s)
    assert once.fragments == s.fragments + (s.bench_virtme_fragment,)
    assert benchrun.virtme_settings(once).fragments == once.fragments


def test_edit_to_verdict_without_dev_tree_says_how_to_run_it():
    b = benchrun.Bench(load(), 3)
    rows = benchsuite.edit_to_verdict(b)
    assert [r.name for r in rows] == [n for _, _, n in benchsuite.EDITS]
    assert all(r.samples == () and r.note == bench.NOT_RUN_EDIT for r in rows)


def test_retest_verdict_notes_a_wrong_path_and_a_failure():
    ok = runner.Result(("invoke",), 0, "retest: module-reload (overlay.ko only)\n", "")
    assert benchsuite._judged(ok, "module-reload") == "retest: module-reload (overlay.ko only)"
    wrong = runner.Result(("invoke",), 1, "", "retest: reboot (fs/super.c)\n")
    assert benchsuite._judged(wrong, "module-reload") == "retest: reboot (expected module-reload) (fs/super.c), exit 1"
    missing = runner.Result(("invoke",), 2, "", "No idea what 'retest' is!\n")
    assert benchsuite._judged(missing, "reboot").startswith("exit 2: ")


def test_bench_refuses_bad_repeat_and_dev_tree(tmp_path):
    s = replace(load(), results_dir=tmp_path)
    with pytest.raises(errors.BadArgument, match="--repeat 0"):
        benchmain.run(s, ("boot",), 0)
    with pytest.raises(errors.BadArgument, match="not a kernel tree"):
        benchmain.run(s, ("edit",), 1, tmp_path)


def test_bench_runs_the_edit_measurement_without_dev_tree(tmp_path):
    s = replace(load(), results_dir=tmp_path)
    rows, path = benchmain.run(s, ("edit",), 2)
    assert [r.note for r in rows] == [bench.NOT_RUN_EDIT] * 2
    assert json.loads(path.read_text())["host"]["accelerator"] == "no guest booted"


def test_edit_to_verdict_makes_a_real_edit_and_restores_the_file(tmp_path, monkeypatch):
    """A touch leaves overlay.ko byte for byte the same (retest says "unchanged"), so the
    bench adds a kept symbol; the file is restored even when retest fails."""
    tree = tmp_path / "tree"
    for path, _, _ in benchsuite.EDITS:
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text("int x;\n")
    seen = []

    def fake_invoke(settings, cwd, *args, check=True):
        edited = [(tree / p).read_text() for p, _, _ in benchsuite.EDITS]
        seen.append((args, edited))
        mode = "module-reload" if "ovl_bench_edit" in edited[0] else "reboot"
        return runner.Result(("invoke",) + args, 0, f"retest: {mode} (edited)\n", "")

    monkeypatch.setattr(benchsuite, "invoke", fake_invoke)
    rows = benchsuite.edit_to_verdict(benchrun.Bench(load(), 2, dev_tree=tree))
    assert len(seen) == 5 and all("--fs" in a and "-k" in a for a, _ in seen)
    assert seen[0][1] == ["int x;\n", "int x;\n"]                           # the uncounted warm-up
    assert "__used" in seen[1][1][0] and seen[1][1][1] == "int x;\n"       # one file at a time
    assert seen[1][1][0] != seen[2][1][0]                                   # a new edit per sample
    assert [r.note for r in rows] == ["retest: module-reload (edited)", "retest: reboot (edited)"]
    assert all((tree / p).read_text() == "int x;\n" for p, _, _ in benchsuite.EDITS)
