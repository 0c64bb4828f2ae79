"""`invoke bench`: what a scenario costs, the whole suite on P, and the edit-to-verdict loop.

A scenario's SSH round trips are timed by the connection itself
(``$OVH_SSH_TIMING``, :func:`vm.machine.ssh.record_timing`), in the real pytest
session of the suite, so the timing hooks change nothing the scenario does.
"""

from __future__ import annotations

import statistics
import time

from vm import bench, errors, pipeline, runner
from vm.benchrun import TOUCH_CORE, TOUCH_OVL, Bench, invoke, timed
from vm.machine.ssh import TIMING_VAR
from vm.suites import suite
from vm.suites.suite import SuiteRequest


def session(b: Bench, name: str, keyword: str | None) -> tuple[float, dict[str, bench.Breakdown], dict[str, float]]:
    """One scenario session on P: its wall time, per-test breakdowns and JUnit times."""
    s, kernel = b.settings, b.kernel()
    results = b.out / name
    timing = results / "ssh-timing.jsonl"
    results.mkdir(parents=True, exist_ok=True)
    timing.unlink(missing_ok=True)
    req = SuiteRequest(name=name, tests=(s.suites.rows,), results_dir=results,
                       kernels=((pipeline.PATCHED, kernel.build_dir),), image=b.image().path, keyword=keyword,
                       log=results / "pytest.log")
    start = time.monotonic()
    result = suite.run(s.project_root, req, env={TIMING_VAR: str(timing)})
    wall = time.monotonic() - start
    result.check()
    lines = timing.read_text().splitlines() if timing.is_file() else []
    return wall, bench.breakdowns(lines), bench.case_times(req.xml)


def row_id(b: Bench) -> str:
    return f"test_row[{b.settings.bench_row}-{b.settings.bench_fs}-{pipeline.PATCHED}]"


def scenario(b: Bench) -> list[bench.Row]:
    """One row (``ovl.bench_row`` on ``ovl.bench_fs``) on P, broken down by phase."""
    case = row_id(b)
    runs = []
    for _ in range(b.repeat):
        _, parts, times = session(b, "scenario", f"[{b.settings.bench_row}-{b.settings.bench_fs}-")
        part = parts.get(case, bench.Breakdown())
        runs.append((times.get(case, 0.0) - part.boot, part))
    rows = [bench.Row(f"scenario {case}: wall (boot excluded)", tuple(w for w, _ in runs)),
            bench.Row("  SSH round trips, all (seconds)", tuple(p.ssh_seconds for _, p in runs),
                      f"{runs[0][1].round_trips} round trips")]
    phases = sorted({ph for _, p in runs for ph in p.seconds if ph not in ("connect", "reboot")})
    for phase in phases:
        rows.append(bench.Row(f"  {phase}", tuple(p.seconds.get(phase, 0.0) for _, p in runs),
                              f"{runs[0][1].count.get(phase, 0)} commands"))
    rows.append(bench.Row("  harness outside SSH (pytest, fixtures, checks)",
                          tuple(w - p.ssh_seconds for w, p in runs)))
    return rows


def whole_suite(b: Bench) -> list[bench.Row]:
    """Every row on ext4 and xfs on P, one session each time; per scenario the median."""
    walls, per_case = [], {}
    for _ in range(b.repeat):
        wall, parts, times = session(b, "suite", None)
        walls.append(wall)
        for case, seconds in times.items():
            per_case.setdefault(case, []).append(seconds - parts.get(case, bench.Breakdown()).boot)
    medians = {case: statistics.median(v) for case, v in per_case.items()}
    slowest = max(medians, key=medians.get) if medians else "-"
    all_rows = [x for v in per_case.values() for x in v]
    return [bench.Row(f"suite on P: whole session ({len(per_case)} scenarios, boot included)", tuple(walls)),
            bench.Row("scenario: one row (median of the suite's rows)", tuple(all_rows),
                      f"slowest: {slowest} {medians.get(slowest, 0):.2f}s"),
            bench.Row("scenario: median per row, the rows' medians", tuple(medians.values()))]


EDITS = ((TOUCH_OVL, "module-reload", "edit-to-verdict: util.c, module reload"),
         (TOUCH_CORE, "reboot", "edit-to-verdict: super.c, reboot"))


def edit_to_verdict(b: Bench) -> list[bench.Row]:
    """Make a real edit of one file in ``--dev-tree`` (one that changes the object code:
    a touch, or a comment, rebuilds the object but leaves overlay.ko and vmlinux.o byte
    for byte the same, and retest rightly says "unchanged"), then `invoke retest --tree
    DIR -k ROWS --fs FS`, whole process.  The file is restored afterwards."""
    if b.dev_tree is None:
        return [bench.not_run(name, bench.NOT_RUN_EDIT) for _, _, name in EDITS]
    _retest(b)      # not counted: the loop guest up and the build in step with the tree
    rows = []
    for path, expected, name in EDITS:
        samples, notes = [], set()
        target = b.dev_tree / path
        original = target.read_bytes()
        try:
            for n in range(b.repeat):
                target.write_bytes(original + edit_line(n).encode())
                res = []
                samples.append(timed(lambda: res.append(_retest(b))))
                notes.add(_judged(res[0], expected))
        finally:
            target.write_bytes(original)
        rows.append(bench.Row(name, tuple(samples), "; ".join(sorted(notes))))
    return rows


def _retest(b: Bench) -> runner.Result:
    return invoke(b.settings, None, "retest", "--tree", str(b.dev_tree), "-k", b.settings.bench_edit_rows,
                  "--fs", b.settings.bench_edit_fs, check=False)


def edit_line(n: int) -> str:
    """A line that changes the object code of the file it ends (a new, kept symbol)."""
    return f"\nstatic const char ovl_bench_edit_{n}[] __used = \"bench edit {n}\";\n"


def _judged(res: runner.Result, expected: str) -> str:
    try:
        got = bench.parse_retest(res.stdout + "\n" + res.stderr)
    except errors.BadArgument as exc:      # no retest line
        return f"exit {res.returncode}: {exc}"
    verdict = "" if res.returncode == 0 else f", exit {res.returncode}"
    wrong = "" if got.mode == expected else f" (expected {expected})"
    return f"retest: {got.mode}{wrong} ({got.why}){verdict}"
