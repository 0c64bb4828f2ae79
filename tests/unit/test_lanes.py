"""`invoke ci` in lanes (vm/lanes.py): shards as child processes, at most N at once.

The children are a fake: a small script that replaces every phase runner with a
stand-in (print, wait, fail or hang as tests/unit told it in conf.json) and then
runs the real child entry point (vm.lanechild.main), so the settings and the plan
make the real round trip through lanes.json and the real run_shard writes the
manifests the real merge reads.  No kernel, no guest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vm import ci, errors, lanes, runner
from vm.settings import Settings, load
from vm.suites import merge

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

FAKE_CHILD = """\
import json, os, signal, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, {root!r})
from vm import ci, errors, lanechild

MODES = json.loads((HERE / "conf.json").read_text())


def until(ready, seconds):
    deadline = time.monotonic() + seconds
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.02)


def fake(s, phase):
    name, mode = phase.shard, MODES.get(phase.shard, "quick")
    mark = HERE / "running" / name
    mark.touch()
    start = time.time()
    print(f"stdout of {{name}}")
    print(f"stderr of {{name}}", file=sys.stderr)
    try:
        if mode == "fail":
            raise errors.LintFailed(count=1, patches=f"{{name}}.patch")
        if mode == "pair":          # stay until another shard runs too (or 3 s pass)
            until(lambda: len(list(mark.parent.iterdir())) > 1, 3)
            time.sleep(0.2)
        if mode == "until-noticed":  # stay until the parent has reported a failure
            until(lambda: (HERE / "noticed").exists(), 20)
        if mode in ("hang", "stubborn"):
            if mode == "stubborn":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            sleeper = subprocess.Popen(["sleep", "60"])        # a grandchild, in the shard's group
            (HERE / "pids" / name).write_text(f"{{os.getpid()}} {{sleeper.pid}}")
            time.sleep(30)                                      # bounded: a broken scheduler fails, never hangs
    finally:
        (HERE / "times" / f"{{name}}.json").write_text(json.dumps([start, time.time()]))
        mark.unlink()
    return []


ci.RUNNERS = {{kind: fake for kind in ci.RUNNERS}}
ci.accel_used = lambda s, out: "tcg (fake)"
sys.exit(lanechild.main(sys.argv[1:]))
"""


class Fake:
    """The fake children's directory, what the parent printed and which shards it started."""

    def __init__(self, root: Path, modes: dict[str, str]) -> None:
        self.dir = root
        for sub in ("running", "times", "pids"):
            (root / sub).mkdir(parents=True)
        (root / "conf.json").write_text(json.dumps(modes))
        self.script = root / "child.py"
        self.script.write_text(FAKE_CHILD.format(root=str(ROOT)))
        self.lines: list[str] = []
        self.launched: list[str] = []

    def command(self, plan_file: Path, shard: str) -> list[str]:
        return [sys.executable, str(self.script), str(plan_file), shard]

    def emit(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("lanes: shard ") and " failed (" in line:
            (self.dir / "noticed").touch()

    def times(self) -> dict[str, tuple[float, float]]:
        return {p.stem: tuple(json.loads(p.read_text())) for p in (self.dir / "times").iterdir()}

    def pids(self) -> list[int]:
        return [int(pid) for p in (self.dir / "pids").iterdir() for pid in p.read_text().split()]

    def ready(self, names: list[str], seconds: float = 30.0) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if all((self.dir / "pids" / n).exists() for n in names):
                return True
            time.sleep(0.05)
        return False


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """``fake(modes)``: `invoke ci` runs the fake child, prints into Fake.lines, records its starts."""
    made: list[Fake] = []

    def make(modes: dict[str, str]) -> Fake:
        f = Fake(tmp_path / "fake", modes)
        made.append(f)
        monkeypatch.setattr(lanes, "child_command", f.command)
        monkeypatch.setattr(lanes, "printer", lambda: f.emit)
        monkeypatch.setattr(lanes, "GRACE", 1.5)
        real_start = runner.start

        def start(cmd, **kw):
            f.launched.append(str(list(cmd)[-1]))
            return real_start(cmd, **kw)
        monkeypatch.setattr(runner, "start", start)
        return f

    yield make
    for f in made:      # never leave a child behind, whatever the test did
        for pid in f.pids():
            if runner.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _settings(tmp_path: Path, n: int) -> Settings:
    return replace(load(), results_dir=tmp_path / "results", ci_lanes=n)


def _phases(*names: str) -> list[ci.Phase]:
    return [ci.Phase(name, "unit", f"fake work of {name}") for name in names]


def _most_at_once(spans: dict[str, tuple[float, float]]) -> int:
    edges = sorted([(t0, 1) for t0, _ in spans.values()] + [(t1, -1) for _, t1 in spans.values()])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_never_more_than_n_shards_at_once_and_they_start_in_plan_order(fake, tmp_path):
    f = fake({name: "pair" for name in "abcd"})
    s = _settings(tmp_path, 2)
    merged = ci.run_all(s, _phases("a", "b", "c", "d"))
    assert f.launched == ["a", "b", "c", "d"]
    spans = f.times()
    assert sorted(spans) == ["a", "b", "c", "d"]
    assert _most_at_once(spans) == 2, spans     # two lanes used, never three
    assert [sh.name for sh in merged.shards] == ["a", "b", "c", "d"]
    assert (s.results_dir / merge.SUMMARY).is_file()
    assert merged.failed == [] and merged.missing == []


def test_one_lane_runs_one_shard_at_a_time(fake, tmp_path):
    """The bound itself: with N = 1 through the lanes code, no two spans overlap."""
    f = fake({})
    s = _settings(tmp_path, 1)
    lanes.run(s, _phases("a", "b", "c"), False, ci.shard_dir, lambda d: None, command=f.command, emit=f.emit)
    assert f.launched == ["a", "b", "c"]
    assert _most_at_once(f.times()) == 1


def test_every_line_is_prefixed_and_kept_in_the_shards_log(fake, tmp_path):
    f = fake({})
    s = _settings(tmp_path, 2)
    ci.run_all(s, _phases("a", "b"))
    for name in "ab":
        assert f"[{name}] stdout of {name}" in f.lines and f"[{name}] stderr of {name}" in f.lines
        log = (s.results_dir / "shards" / f"{name}.log").read_text()
        assert f"stdout of {name}\n" in log and f"stderr of {name}\n" in log
        assert not any(line.startswith(f"[{name}] ") for line in log.splitlines())   # the child's own lines
        assert (s.results_dir / "shards" / name / ci.MANIFEST).is_file()   # beside the shard dir, not in it
        phase_lines = [line for line in f.lines if line.startswith(f"[{name}] ==> ")]
        assert phase_lines and all(line.count(f"[{name}]") == 1 for line in phase_lines), phase_lines
    assert not any(line.startswith("[a]") and "of b" in line for line in f.lines)
    last = f.lines[-1]
    assert last.startswith("lanes: a ") and ", b " in last and last.endswith("in 2 lanes"), last


def test_a_failing_shard_stops_new_starts_and_the_running_ones_finish(fake, tmp_path):
    f = fake({"a": "until-noticed", "b": "fail"})
    s = _settings(tmp_path, 2)
    with pytest.raises(errors.ShardsFailed, match=r"1 shard\(s\) failed: b;"):
        ci.run_all(s, _phases("a", "b", "c", "d"))
    assert f.launched == ["a", "b"]
    assert (f.dir / "noticed").exists()
    assert f.times()["a"][1] >= (f.dir / "noticed").stat().st_mtime - 0.05   # a ran on after b failed
    shards = s.results_dir / "shards"
    assert json.loads((shards / "a" / ci.MANIFEST).read_text())["status"] == "passed"
    assert json.loads((shards / "b" / ci.MANIFEST).read_text())["status"] == "failed"
    assert not (shards / "c").exists() and not (shards / "d").exists()
    failure = [line for line in f.lines if line.startswith("lanes: shard b failed")]
    assert failure == [f"lanes: shard b failed (exit status 2); log: {shards / 'b.log'}; "
                       "not starting c, d, waiting for a"]
    assert "checkpatch --strict is not clean" in (shards / "b.log").read_text()
    assert f.lines[-1].endswith("(not run: c, d)")
    summary = (s.results_dir / merge.SUMMARY).read_text()      # the merge of what started
    assert "| a |" in summary and "| b |" in summary and "failed" in summary


def _stop_children(kind: str, f: Fake, monkeypatch) -> list[str]:
    """Interrupt the parent once both children (and their grandchildren) run; what went wrong."""
    wrong: list[str] = []
    if kind == "error":     # the parent fails while starting the third shard
        real_start = runner.start

        def start(cmd, **kw):
            if list(cmd)[-1] == "c":
                f.ready(["a", "b"])
                raise errors.MissingTool(tool="fake-child", package="none")
            return real_start(cmd, **kw)
        monkeypatch.setattr(runner, "start", start)
        return wrong
    sig = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM}[kind]

    def later():
        f.ready(["a", "b"])         # on a timeout too: the test then fails, it does not hang
        if signal.getsignal(sig) in (signal.SIG_DFL, None):     # it would end pytest itself
            wrong.append(f"{sig.name} has no handler while the lanes run")
            os.kill(os.getpid(), signal.SIGINT)
            return
        os.kill(os.getpid(), sig)
    threading.Thread(target=later, daemon=True).start()
    return wrong


@pytest.fixture
def sigint_as_from_a_terminal():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, also when pytest was started with
    SIGINT ignored (in the background, or inside an `invoke ci` lane); restored after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("kind", ["ctrl-c", "sigterm", "error"])
@pytest.mark.usefixtures("sigint_as_from_a_terminal")
def test_an_interrupt_stops_every_childs_process_group_and_the_merge_still_happens(fake, monkeypatch,
                                                                                    tmp_path, kind):
    f = fake({"a": "hang", "b": "stubborn"})
    s = _settings(tmp_path, 3 if kind == "error" else 2)
    wrong = _stop_children(kind, f, monkeypatch)
    raised = errors.MissingTool if kind == "error" else KeyboardInterrupt
    t0 = time.monotonic()
    with pytest.raises(raised):
        ci.run_all(s, _phases("a", "b", "c"))
    assert wrong == []
    assert time.monotonic() - t0 < 25
    pids = f.pids()
    assert len(pids) == 4, "both children and their grandchildren ran"
    assert [p for p in pids if runner.pid_alive(p)] == [], "a child or grandchild is left running"
    groups = [int(p.read_text().split()[0]) for p in (f.dir / "pids").iterdir()]
    assert not any(runner.group_alive(g) for g in groups)
    assert "lanes: shard a failed (exit status 130); log: " in "\n".join(f.lines)    # it cleaned up
    assert "lanes: shard b failed (killed by SIGKILL); log: " in "\n".join(f.lines)  # it ignored SIGTERM
    statuses = {d.name: json.loads((d / ci.MANIFEST).read_text())["status"]
                for d in (s.results_dir / "shards").iterdir() if d.is_dir()}
    assert statuses == {"a": "failed", "b": "running"}
    assert "| a |" in (s.results_dir / merge.SUMMARY).read_text()


def test_one_lane_is_todays_run_in_this_process(monkeypatch, tmp_path):
    """ovl.ci_lanes 1: no child, no plan file, phases in plan order, the first failure's own error."""
    ran: list[str] = []

    def work(s, phase):
        ran.append(phase.shard)
        if phase.shard == "b":
            raise errors.LintFailed(count=1, patches="b.patch")
        return []

    def no_child(*a, **kw):
        raise AssertionError("ovl.ci_lanes 1 started a process")

    monkeypatch.setattr(ci, "RUNNERS", {kind: work for kind in ci.RUNNERS})
    monkeypatch.setattr(ci, "accel_used", lambda s, out: "tcg (test)")
    monkeypatch.setattr(runner, "start", no_child)
    monkeypatch.setattr(lanes, "run", no_child)
    s = _settings(tmp_path, 1)
    with pytest.raises(errors.LintFailed):
        ci.run_all(s, _phases("a", "b", "c"))
    assert ran == ["a", "b"]
    assert not (s.results_dir / "shards" / lanes.PLAN_FILE).exists()
    assert "| b | - | failed" in (s.results_dir / merge.SUMMARY).read_text()


class Called(Exception):
    pass


def test_more_lanes_go_through_vm_lanes(monkeypatch, tmp_path):
    def run(s, phases, full, shard_dir, started):
        raise Called(s.ci_lanes, [p.shard for p in phases], full, shard_dir)

    monkeypatch.setattr(lanes, "run", run)
    monkeypatch.setattr(ci, "RUNNERS", {})       # an in-process run would fail on a KeyError
    with pytest.raises(Called) as called:
        ci.run_all(_settings(tmp_path, 2), _phases("a"), True)
    assert called.value.args == (2, ["a"], True, ci.shard_dir)


def test_the_plan_file_gives_the_child_the_parents_settings_and_plan(tmp_path):
    s = replace(load(), results_dir=tmp_path / "elsewhere", ci_lanes=3, ci_rows_for={"patched": ("x", "y")})
    phases = ci.plan(s, full=True)
    sent = lanes.Plan(s, tuple(p.to_dict() for p in phases), True)
    back = lanes.Plan.read(sent.write(tmp_path / lanes.PLAN_FILE))
    assert back.settings == s and back.full is True
    assert [ci.Phase.from_dict(p) for p in back.phases] == phases
    assert ci.plan_id([ci.Phase.from_dict(p) for p in back.phases]) == ci.plan_id(phases)
    assert Settings.from_mapping(s.to_dict()) == s


def test_the_child_is_python_m_vm_lanechild_and_refuses_a_bad_plan(tmp_path):
    plan = tmp_path / lanes.PLAN_FILE
    assert lanes.child_command(plan, "unit") == [sys.executable, "-m", "vm.lanechild", str(plan), "unit"]
    plan.write_text("{}")
    res = subprocess.run(lanes.child_command(plan, "unit"), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: {plan} is not a plan `invoke ci` wrote"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", [0, -1, "two", True, None, 1.5])
def test_ci_lanes_must_be_a_whole_number_of_at_least_one(value):
    with pytest.raises(errors.BadArgument, match=r"ovl.ci_lanes must be a whole number >= 1.*--lanes N"):
        Settings.from_mapping({"ci_lanes": value})


def test_ci_lanes_defaults_and_overrides():
    assert Settings().ci_lanes == 1
    assert load().ci_lanes == 2                       # invoke.yaml: a TCG guest uses about one core
    assert load(ci_lanes="3").ci_lanes == 3           # `invoke ci --lanes 3` passes a string


def test_invoke_ci_lanes_0_is_refused_before_anything_runs():
    res = subprocess.run([sys.executable, "-m", "invoke", "ci", "--lanes", "0", "--list-shards"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "ovl.ci_lanes must be a whole number >= 1, not '0'" in res.stderr
    assert res.stdout == ""
