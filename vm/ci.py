"""The test command as data: the phases `invoke ci` runs, grouped into shards.

:func:`plan` lists every :class:`Phase` of a tier, computed from the settings
(``ovl.bases``, ``ovl.ci_variants``, ``ovl.ci_rows_for``, the series' prefixes),
never from names written here.  Each phase belongs to one shard; a shard is
what one CI job runs (``invoke ci --shard NAME``), ``invoke ci`` runs every
shard (one after the other, or ``ovl.ci_lanes`` at once: :mod:`vm.lanes`), and
``invoke ci --list-shards`` prints them as the JSON a CI job matrix reads.
Each shard writes its results and a manifest (``shard.json``) into
``<results>/shards/<shard>/``; :mod:`vm.suites.merge` joins them into one
matrix and one JUnit file.

Adding a phase is one line in :func:`_main_phases` (or :func:`_full_phases`)
and, for a new kind of work, one function in :data:`RUNNERS`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

from vm import errors, lanes, pipeline, runner
from vm.machine import qemu
from vm.settings import Settings
from vm.suites import fstests, merge
from vm.suites.scenario import Expectations
from vm.suites.suite import SuiteResult

MANIFEST = merge.MANIFEST
#: the pytest marker of the series round-trip test (tests/bisect), run by `invoke ci --full` only
ROUNDTRIP = "roundtrip"
#: the test command always has its inputs (SCENARIOS.md, sshd): a missing one fails, never skips
UNIT_OPTIONS = ("--require-inputs",)


@dataclass(frozen=True)
class Phase:
    """One step of the test command: what it runs, and which shard (CI job) runs it."""

    shard: str                                  # the job that runs it, e.g. "scenarios-prefix-3"
    kind: str                                   # a key of RUNNERS
    title: str                                  # the runner.phase banner
    base: str = ""                              # kernel base it works on ("" for no kernel)
    variants: tuple[str, ...] = ()              # kernel variants it builds or tests
    rows: tuple[str, ...] = ()                  # only these SCENARIOS.md rows ("": every row)
    suite: str = ""                             # ovl.suites key of the pytest paths it runs
    results: str = ""                           # the suite's results file stem ("" for no suite)
    markers: str = ""                           # pytest -m expression for a "suite" phase ("": all)
    filesystems: tuple[str, ...] = ()           # base filesystems of an fstests_full phase

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Phase":
        """What :meth:`to_dict` wrote (JSON: its tuples came back as lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class Shard:
    name: str
    base: str
    phases: tuple[Phase, ...]


# --- the plan --------------------------------------------------------------------------

def _main_phases(s: Settings, full: bool) -> list[Phase]:
    base = s.base
    variants = s.ci_full_variants if full else s.ci_variants
    rows_for = s.ci_full_rows_for if full else s.ci_rows_for
    every = [v.label for v in pipeline.prefix_variants(s)] + [f"{pipeline.PATCHED}-debug"]
    spare = tuple(v for v in every if v not in variants)
    pair = (pipeline.BASELINE, pipeline.PATCHED)
    return [
        Phase("unit", "unit", "unit tests", suite="unit", results="unit"),
        *[Phase(f"lint-{b}", "lint", f"lint {b}: checkpatch --strict, cover letter", base=b) for b in s.bases],
        Phase("build", "build", f"build the prefixes no scenario shard builds ({', '.join(spare)})",
              base=base, variants=spare),
        # the field's own suites on the scenario kernels (kconfig/fstests.config is in
        # ovl.fragments): the series' fstests test and the overlay tests that touch volatile,
        # workdir or incompat handling, judged as P against B; unionmount-testsuite on both.  The
        # longest shards, so they start first: in lanes (ovl.ci_lanes) the short ones fill in
        Phase("fstests", "fstests", f"fstests -overlay {', '.join(s.fstests_ci_tests)} on baseline, "
              f"patched ({', '.join(s.fstests_ci_fs)})", base=base, variants=pair, results="fstests/fstests"),
        Phase("unionmount", "unionmount", "unionmount-testsuite on baseline, patched", base=base,
              variants=pair, results="unionmount/unionmount"),
        *[Phase(f"scenarios-{v}", "scenarios", f"build {v} and run the scenarios on it", base=base,
                variants=(v,), rows=tuple(rows_for.get(v, ())), suite="scenarios", results="scenarios")
          for v in variants],
        Phase("boot-failures", "boot_failures", "boot failures: panic, hang, wrong key, detach, KVM fallback",
              base=base, variants=(pipeline.BASELINE,), suite="boot_failures", results="boot-failures"),
        Phase("faults", "suite", "faults: killed builds and boots, two runs at once, hung guest commands",
              suite="faults", results="faults"),
        Phase("bisect", "suite", "bisect a kernel history (tests/bisect)", suite="bisect", results="bisect",
              markers=f"slow and not {ROUNDTRIP}"),
    ]


def _full_phases(s: Settings) -> list[Phase]:
    pair = (pipeline.BASELINE, pipeline.PATCHED)
    out = [Phase("mutation", "mutation", "mutation check (series without its last patch)", base=s.base),
           # every overlay/quick test, B then P, a shard per base fs so that two lanes run
           # them side by side: 46-47 min each measured under TCG, ~10 min more since the
           # union tests run (README); one shard for both fs took ~110 min
           *[Phase(f"fstests-full-{fs}", "fstests_full", f"fstests -overlay -g {', '.join(s.fstests_full_groups)} "
                   f"on baseline, patched ({fs})", base=s.base, variants=pair, filesystems=(fs,))
             for fs in fstests.FILESYSTEMS],
           # review finding 2 on a kernel of its own (overlayfs built in, kprobe events): its
           # kconfig/boot-rng.config turns CONFIG_TRACING on, which changes include/linux/kernel.h,
           # so ccache cannot help: BOOT_ID_COLD_BUILD measured, over the main tier's cold budget
           Phase("boot-id", "boot_id", "boot id from a seeded RNG, overlayfs built in (review finding 2)",
                 base=s.base, variants=(pipeline.PATCHED,), suite="boot_id", results="boot-id"),
           Phase("fstests-mutation", "fstests_mutation", "fstests mutation: overlay/118 without the errseq patch",
                 base=s.base),
           # issue 13's round trip on a real kernel history: 58 s warm (436 s cold under load);
           # with it the warm main tier measured 15 min 51 s, over its 15 minutes
           Phase("series-roundtrip", "suite", "series checkout -> commit -> export round trip (tests/bisect)",
                 suite="bisect", results="series-roundtrip", markers=ROUNDTRIP)]
    for b in s.bases:
        if b != s.base:
            prefixes = tuple(v.label for v in pipeline.prefix_variants(s.with_base(b)))
            out.append(Phase(f"matrix-{b}", "build", f"build every series prefix on {b}", base=b,
                             variants=prefixes))
        out.append(Phase(f"matrix-{b}", "matrix", f"version matrix on {b}", base=b, variants=pair,
                         suite="rows", results="matrix"))
    return out


def plan(s: Settings, full: bool = False) -> list[Phase]:
    """Every phase of the main tier (and of the full tier with ``full``), in the order run."""
    phases = [p for p in _main_phases(s, full) if p.kind != "build" or p.variants]
    if not full:
        return phases
    # longest first, so that in lanes the rest fills in beside them: overlay/quick per fs
    extra = _full_phases(s)
    longest = [p for p in extra if p.kind == "fstests_full"]
    return longest + phases + [p for p in extra if p not in longest]


def shards(phases: Iterable[Phase]) -> list[Shard]:
    """The phases grouped by shard, in the order their first phase appears."""
    grouped: dict[str, list[Phase]] = {}
    for p in phases:
        grouped.setdefault(p.shard, []).append(p)
    return [Shard(name, next((p.base for p in ps if p.base), ""), tuple(ps)) for name, ps in grouped.items()]


def plan_id(phases: Iterable[Phase]) -> str:
    """Names the plan: every shard of one run records it, so a merge can tell two plans apart."""
    text = json.dumps([p.to_dict() for p in phases], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_matrix(s: Settings, full: bool = False) -> dict:
    """What ``invoke ci --list-shards`` prints: a CI job matrix, ``{"include": [{"shard", "base", ...}]}``."""
    phases = plan(s, full)
    ident, tier = plan_id(phases), "full" if full else "main"
    return {"include": [{"shard": sh.name, "base": sh.base or "-", "tier": tier, "plan": ident}
                        for sh in shards(phases)]}


#: the GitLab child pipeline's job templates (``.shard``, ``.merge``), next to .gitlab-ci.yml
GITLAB_TEMPLATES = ".gitlab/ci-shards.yml"


def gitlab_pipeline(s: Settings, full: bool = False) -> dict:
    """``invoke ci --list-shards --gitlab``: the child pipeline running every shard, then the merge.

    JSON is YAML, so GitLab reads the printed document as it is (``trigger: include: artifact:``)."""
    names = [row["shard"] for row in shard_matrix(s, full)["include"]]
    return {"include": [{"local": GITLAB_TEMPLATES}],
            "variables": {"OVL_TIER_FLAG": "--full" if full else ""},
            "shard": {"extends": ".shard", "parallel": {"matrix": [{"SHARD": names}]}},
            "merge": {"extends": ".merge"}}


def pick(phases: list[Phase], name: str) -> Shard:
    for sh in shards(phases):
        if sh.name == name:
            return sh
    raise errors.BadArgument(what=f"unknown shard {name!r}",
                             fix=f"use one of {', '.join(sh.name for sh in shards(phases))} "
                                 "(`invoke ci --list-shards`)")


# --- what a phase covers (for the check that the shards are exactly the tier) -----------

def cells(s: Settings, phase: Phase) -> list[str]:
    """The units of work ``phase`` does: one string per kernel built, base linted, scenario run, suite."""
    if phase.kind == "lint":
        return [f"lint:{phase.base}"]
    if phase.kind == "build":
        return [f"build:{phase.base}/{v}" for v in phase.variants]
    if phase.kind in ("scenarios", "matrix"):
        table = Expectations.load(s.suite_path("expectations"))
        tag = "" if phase.kind == "scenarios" else f"@{phase.base}"
        runs = [f"{phase.kind}:{row}[{fs}-{v}{tag}]" for v in phase.variants
                for row in (phase.rows or table.row_ids) for fs in table.filesystems]
        if phase.kind == "matrix":          # its kernels: the scenario shards' and its base's build phase
            return runs
        return [f"build:{phase.base}/{v}" for v in phase.variants] + runs + [f"smoke:{v}" for v in phase.variants]
    if phase.kind == "fstests_full":
        return [f"fstests_full:{phase.base}/{fs}" for fs in phase.filesystems]
    return [f"{phase.kind}:{phase.suite or phase.base}" + (f"[{phase.markers}]" if phase.markers else "")]


# --- running ------------------------------------------------------------------------------

def _variants(phase: Phase) -> list[pipeline.Variant]:
    return [pipeline.Variant.parse(v) for v in phase.variants]


def unit(s: Settings) -> SuiteResult:
    """``invoke unit``: the fast tier, with every input it needs required."""
    return pipeline.tests_without_kernels(s, "unit", markers="unit", options=UNIT_OPTIONS).check()


def _unit(s: Settings, phase: Phase) -> list[SuiteResult]:
    return [unit(s)]


def lint(s: Settings, source: str | None = None) -> None:
    """checkpatch --strict on the series of ``s.base`` and its cover letter up to date."""
    tree = pipeline.get_tree(s, source)
    with runner.phase(f"checkpatch --strict ({s.base})"):
        pipeline.lint(s, tree)
    with runner.phase(f"cover letter up to date ({s.base})"):
        print(f"cover letter up to date: {pipeline.check_cover_letter(s, tree)}")


def _lint(s: Settings, phase: Phase) -> list[SuiteResult]:
    lint(s.with_base(phase.base))
    return []


def _build(s: Settings, phase: Phase) -> list[SuiteResult]:
    per_base = s.with_base(phase.base)
    for label, kernel in pipeline.build_variants(per_base, _variants(phase)):
        print(f"{label}: {kernel.bzimage}")
    pipeline.guest_image(s)
    return []


def _scenarios(s: Settings, phase: Phase) -> list[SuiteResult]:
    kernels = pipeline.build_variants(s.with_base(phase.base), _variants(phase))
    rows_for = {v: phase.rows for v in phase.variants} if phase.rows else {}
    skip = f"--ignore={s.suites.boot_failures}"     # its own shard: run once, not once per variant
    return [pipeline.scenarios(s, kernels, name=phase.results, tests=phase.suite, rows_for=rows_for,
                               options=(skip,)).check()]


def _boot_failures(s: Settings, phase: Phase) -> list[SuiteResult]:
    kernels = pipeline.build_variants(s.with_base(phase.base), _variants(phase))
    return [pipeline.scenarios(s, kernels, name=phase.results, tests=phase.suite).check()]


def _boot_id(s: Settings, phase: Phase) -> list[SuiteResult]:
    rng = pipeline.boot_rng_settings(s.with_base(phase.base))
    kernels = pipeline.build_variants(rng, _variants(phase))
    return [pipeline.scenarios(s, kernels, name=phase.results, tests=phase.suite).check()]


def _suite(s: Settings, phase: Phase) -> list[SuiteResult]:
    return [pipeline.tests_without_kernels(s, phase.suite, markers=phase.markers or None).check()]


def mutation(s: Settings, source: str | None = None) -> SuiteResult:
    """``invoke mutation``: exactly the rows that need the last patch fail without it."""
    result, targeted = pipeline.mutation(s, source)
    print(f"series without its last patch, judged as the full series: {result.counts()}; "
          f"failed: {result.named('failed')}")
    problems = pipeline.mutation_problems(result, targeted)
    if problems:
        raise errors.MutationCheckFailed(targeted=", ".join(sorted(targeted)), problems="; ".join(problems))
    print("mutation check passed: exactly the rows that need the errseq check went red")
    return result


def _mutation(s: Settings, phase: Phase) -> list[SuiteResult]:
    mutation(s.with_base(phase.base))
    return []       # its JUnit holds the intended failures: the verdict is the check above


def _matrix(s: Settings, phase: Phase) -> list[SuiteResult]:
    kernels = pipeline.matrix_kernels(s, [phase.base], _variants(phase))
    return [pipeline.scenarios(s, kernels, name=phase.results, tests=phase.suite,
                               results_dir=s.results_dir / "matrix").check()]


def _fstests(s: Settings, phase: Phase) -> list[SuiteResult]:
    verdict = pipeline.fstests_check(s.with_base(phase.base), _variants(phase), s.fstests_ci_fs)
    print(verdict.render("fstests -overlay", phase.base))
    return []


def _fstests_full(s: Settings, phase: Phase) -> list[SuiteResult]:
    verdict = pipeline.fstests_check(s.with_base(phase.base), _variants(phase), phase.filesystems,
                                     s.fstests_full_groups)
    print(verdict.render("fstests -overlay", phase.base))
    return []


def _fstests_mutation(s: Settings, phase: Phase) -> list[SuiteResult]:
    pipeline.fstests_mutation_check(s.with_base(phase.base))
    return []


def _unionmount(s: Settings, phase: Phase) -> list[SuiteResult]:
    return [pipeline.unionmount_run(s.with_base(phase.base), _variants(phase)).check()]


RUNNERS: Mapping[str, Callable[[Settings, Phase], list[SuiteResult]]] = {
    "unit": _unit, "lint": _lint, "build": _build, "scenarios": _scenarios,
    "boot_failures": _boot_failures, "boot_id": _boot_id, "suite": _suite, "mutation": _mutation, "matrix": _matrix,
    "fstests": _fstests, "fstests_full": _fstests_full, "fstests_mutation": _fstests_mutation,
    "unionmount": _unionmount,
}


def shard_dir(s: Settings, name: str) -> Path:
    return s.results_dir / "shards" / name


@dataclass
class Record:
    """The manifest of one shard run (``shard.json``), written before and after every phase."""

    shard: str
    plan: str
    tier: str
    shards: list[str]
    base: str
    host: str = field(default_factory=socket.gethostname)
    status: str = "running"
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    phases: list[dict] = field(default_factory=list)
    junit: list[str] = field(default_factory=list)
    accel: str = ""

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(directory / MANIFEST)


def run_shard(s: Settings, shard: Shard, phases: list[Phase], full: bool = False, *,
              tagged: bool = True) -> Path:
    """Run every phase of ``shard`` into its own results dir; stop at the first that fails.
    ``tagged``: name the shard in each phase's ``==>`` line (a lane prefixes every line
    with it already).

    The manifest says which phases ran and how, so a merge tells a shard that
    failed or never finished from one that passed."""
    out = shard_dir(s, shard.name)
    if out.exists():
        shutil.rmtree(out)     # never merge a previous run's verdicts
    rec = Record(shard.name, plan_id(phases), "full" if full else "main", [sh.name for sh in shards(phases)],
                 shard.base)
    rec.phases = [{"title": p.title, "outcome": "not run", "seconds": 0.0, "message": ""} for p in shard.phases]
    rec.save(out)
    mine = replace(s, results_dir=out)
    start = time.monotonic()
    try:
        for entry, phase in zip(rec.phases, shard.phases):
            _run_phase(mine, phase, entry, rec, out, tagged)
        rec.status = "passed"
    finally:
        rec.status = rec.status if rec.status == "passed" else "failed"
        rec.seconds = round(time.monotonic() - start, 1)
        rec.accel = accel_used(s, out)
        rec.save(out)
        (out / merge.SUMMARY).write_text(merge.summary(merge.collect([out])))   # the CI job summary
    return out


def run_all(s: Settings, phases: list[Phase], full: bool = False) -> merge.Merged:
    """``invoke ci``: every shard one after the other (``ovl.ci_lanes`` 1), or that many at
    once, each in a process of its own (:mod:`vm.lanes`); then their merge into
    ``ovl.results_dir``.

    The merged report is written even when a shard fails (no shard starts after that)."""
    started: list[Path] = []
    try:
        if s.ci_lanes > 1:
            lanes.run(s, phases, full, shard_dir, started.append)
        else:
            for each in shards(phases):
                started.append(shard_dir(s, each.name))
                run_shard(s, each, phases, full)
    finally:
        if started:
            merged = merge.collect(started)
            merge.write(merged, s.results_dir)
    merge.check(merged, s.results_dir)
    return merged


def _run_phase(s: Settings, phase: Phase, entry: dict, rec: Record, out: Path, tagged: bool) -> None:
    t0 = time.monotonic()
    try:
        with runner.phase(f"[{phase.shard}] {phase.title}" if tagged else phase.title):
            RUNNERS[phase.kind](s, phase)
        entry["outcome"] = "passed"
    except BaseException as exc:
        text = str(exc) if isinstance(exc, errors.HarnessError) else f"{type(exc).__name__}: {exc}"
        entry["outcome"], entry["message"] = "failed", text
        raise
    finally:
        entry["seconds"] = round(time.monotonic() - t0, 1)
        name = (f"matrix/{phase.results}.xml" if phase.kind == "matrix" else f"{phase.results}.xml")
        if phase.results and phase.kind != "mutation" and (out / name).is_file() and name not in rec.junit:
            rec.junit.append(name)
        rec.save(out)


def accel_used(s: Settings, out: Path) -> str:
    """The accelerator the shard's scenario guests used, as its matrices recorded it; else
    the one this host gives a guest now (the cached KVM probe verdict, or the reason for TCG)."""
    seen = merge.matrix_accels(out)
    if seen:
        return "; ".join(seen)
    try:
        acc = qemu.choose_accel(qemu.ARCHES[s.arch], s.accel, s.sub("accel"), s.kvm_probe_timeout)
    except errors.HarnessError as exc:
        return f"none: {exc}"
    return f"{acc.name} ({acc.reason}) [host verdict; no guest booted in this shard]"
