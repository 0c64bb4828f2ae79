"""fstests (``./check -overlay``) and unionmount-testsuite: the field's own suites.

Host side: the source trees (fetched and verified by :mod:`vm.kernel.fetch` with a
:class:`TreeKind` of this module's recognisers, called from :mod:`vm.pipeline`),
fstests built with the series' own test applied (``patches/fstests/``), each tree
packed into an ext4 disk that the guest mounts, cached by source key + patches.
Guest side: ``local.config``, the base filesystems, the mounts between them (the
``./check`` runs themselves: :mod:`vm.suites.fstests_batch`).
Verdicts: :func:`regression_diff` of the patched kernel against the baseline,
with the per-base known failures (:class:`KnownFailures`, each with a reason).

Nothing here talks to a guest directly: the functions take anything with
``run(cmd, timeout=...)`` (a :class:`vm.machine.guest.Guest`, a fake in the tests).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

from vm import errors, runner
from vm.suites import report

#: bump when the build recipe changes: part of every suite disk's key
RECIPE = "1"
FSTESTS_SERIAL = "ovlfstests"
UNIONMOUNT_SERIAL = "ovlunionmount"
#: where the guest mounts the suite disks (a snapshot disk: writable, thrown away)
FSTESTS_DIR = "/var/lib/xfstests"
UNIONMOUNT_DIR = "/opt/unionmount-testsuite"
RESULT_BASE = "/var/tmp/fstests-results"
TEST_DIR = "/mnt/test"
SCRATCH_MNT = "/mnt/scratch"
FILESYSTEMS = ("ext4", "xfs")
#: fstests' users and groups (README: "Setup ... users")
USERS_SCRIPT = ("getent group fsgqa >/dev/null || groupadd fsgqa",
                "id fsgqa >/dev/null 2>&1 || useradd -m -g fsgqa fsgqa",
                "id fsgqa2 >/dev/null 2>&1 || useradd -m fsgqa2",
                "id 123456-fsgqa >/dev/null 2>&1 || useradd -m 123456-fsgqa")
#: The guest runs no udev (its udevd needs kernel options the guest lacks), so fstests'
#: dm helpers (``_dmsetup_create``: create, then ``_udev_wait``) use its documented
#: fallback, ``udevsettle`` when there is no ``udevadm``: this one makes the
#: /dev/mapper nodes the way udev would.
UDEVSETTLE_SCRIPT = ("if command -v udevadm >/dev/null; then echo 'udevadm is installed but no udevd runs: "
                     "fstests would wait for it forever' >&2; exit 1; fi",
                     "printf '#!/bin/sh\\nexec dmsetup mknodes\\n' > /usr/local/sbin/udevsettle",
                     "chmod 755 /usr/local/sbin/udevsettle")

PASSED, FAILED, NOTRUN = "passed", "failed", "notrun"


class Runs(Protocol):
    def run(self, cmd, **kwargs): ...


# --- recognising the trees -------------------------------------------------------------

def fstests_version(root: Path) -> str | None:
    """``fstests <major.minor.revision>`` if ``root`` is an fstests tree, else None."""
    if not (root / "check").is_file() or not (root / "tests" / "overlay").is_dir():
        return None
    try:
        found = dict(re.findall(r"^PACKAGE_(\w+)=(\S+)", (root / "VERSION").read_text(), re.M))
    except OSError:
        found = {}
    return "fstests " + ".".join(found.get(k, "?") for k in ("MAJOR", "MINOR", "REVISION"))


def unionmount_version(root: Path) -> str | None:
    if not (root / "run").is_file() or not (root / "tests").is_dir():
        return None
    return "unionmount-testsuite"


# --- host-side build -------------------------------------------------------------------

@dataclass(frozen=True)
class SuiteDisk:
    """A suite tree (built if it needs it) packed into an ext4 disk image."""

    name: str          # "fstests", "unionmount"
    key: str           # source key + patches + recipe
    root: Path         # the built tree on the host (for group lists)
    disk: Path         # the ext4 image the guest mounts


def disk_key(tree_key: str, patches: Iterable[Path]) -> str:
    h = hashlib.sha256(f"{RECIPE}\0{tree_key}\0".encode())
    for patch in patches:
        h.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return h.hexdigest()[:16]


def series_patches(directory: Path) -> list[Path]:
    """The ``git format-patch`` files of ``directory`` in order, without the cover letter."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.patch") if not p.name.startswith("0000-"))


def build_disk(name: str, tree: Path, tree_key: str, patches: list[Path], builds_root: Path,
               *, make: bool, jobs: int = 0) -> SuiteDisk:
    """Reuse or build ``<builds_root>/<name>-<key>/``: the tree copied, ``patches``
    applied, ``make`` run if asked, packed into ``disk.ext4``.  Built in a temp dir and
    renamed when complete, under a lock: a failure or a kill leaves nothing reused."""
    key = disk_key(tree_key, patches)
    final = builds_root / f"{name}-{key}"
    builds_root.mkdir(parents=True, exist_ok=True)
    with open(builds_root / f"{name}-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "disk.ext4").is_file():
            runner.echo(f"  {name}: up to date ({final})")
            return SuiteDisk(name, key, final / "src", final / "disk.ext4")
        for stale in [final, *builds_root.glob(f".tmp-{name}-{key}-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{key}-", dir=builds_root))
        try:
            _build_in(name, tree, patches, tmp, make=make, jobs=jobs)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return SuiteDisk(name, key, final / "src", final / "disk.ext4")


def _build_in(name: str, tree: Path, patches: list[Path], tmp: Path, *, make: bool, jobs: int) -> None:
    src = tmp / "src"
    shutil.copytree(tree, src, symlinks=True)
    for patch in patches:
        res = runner.run(["patch", "-p1", "--batch", "--forward", "-d", src, "-i", patch.resolve()],
                         check=False)
        if not res.ok:
            raise errors.SuitePatchDoesNotApply(patch=patch, tree=tree, detail=runner.tail(res.stdout, 2))
    if make:
        log = tmp / "build.log"
        with runner.phase(f"build {name} ({src})"):
            rc = runner.run_logged(["make", f"-j{jobs or os.cpu_count() or 1}"], log, cwd=src,
                                   show=lambda line: False)
        if rc != 0:
            kept = tmp.parent / f"{name}-build-failed.log"       # the temp dir goes; its log stays
            shutil.copy2(log, kept)
            errs = [line for line in log.read_text(errors="replace").splitlines()
                    if "error" in line.lower() and not line.startswith("make")]
            raise errors.SuiteBuildFailed(name=name, reason=(errs[-1].strip() if errs else f"make exited {rc}"),
                                          log=kept, fix="install its build dependencies (./setup.sh) and retry")
    size_mb = int(_du_mb(src) * 1.3) + 64
    runner.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", name[:16], "-E", "root_owner=0:0",
                "-d", src, tmp / "disk.ext4", f"{size_mb}M"], fix="install e2fsprogs (./setup.sh)")


def _du_mb(root: Path) -> float:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(root) for f in files) / 2**20


# --- which tests ----------------------------------------------------------------------

def groups(root: Path, directory: str = "overlay") -> dict[str, set[str]]:
    """``{group: {"overlay/001", ...}}`` from the built tree's ``tests/<dir>/group.list``."""
    found: dict[str, set[str]] = {}
    path = root / "tests" / directory / "group.list"
    for line in path.read_text().splitlines() if path.is_file() else ():
        words = line.split("#", 1)[0].split()
        for group in words[1:]:
            found.setdefault(group, set()).add(f"{directory}/{words[0]}")
    return found


def select(root: Path, group_names: Iterable[str] = (), tests: Iterable[str] = ()) -> list[str]:
    """The tests named (``overlay/118``) and those of the groups (``overlay/quick``), in
    order; an unknown test or group is a one-line error naming what exists."""
    chosen: set[str] = set()
    for name in group_names:
        directory, _, group = name.rpartition("/")
        directory = directory or "overlay"
        known = groups(root, directory)
        if group not in known:
            some = ", ".join(f"{directory}/{g}" for g in sorted(known)[:12])
            raise errors.BadArgument(what=f"unknown fstests group {name!r}",
                                     fix=f"use a group of tests/{directory}/group.list: {some} ...")
        chosen |= known[group]
    for name in tests:
        directory, _, number = name.partition("/")
        if not number or not (root / "tests" / directory / number).is_file():
            raise errors.BadArgument(what=f"unknown fstests test {name!r} (no tests/{name} in {root})",
                                     fix="name a test as overlay/NNN (see tests/overlay/ of fstests)")
        chosen.add(name)
    if not chosen:
        raise errors.BadArgument(what="no fstests test selected", fix="pass -g GROUP or TEST names")
    return sorted(chosen)


# --- guest side ------------------------------------------------------------------------

def local_config(fs: str, test_dev: str, scratch_dev: str, mount_options: str = "",
                 unionmount: str = "") -> str:
    """fstests' ``local.config`` for ``./check -overlay`` on base fs ``fs`` (README.overlay).
    ``unionmount``: where unionmount-testsuite is in the guest, for the tests that run it
    (``-g overlay/union``: overlay/100-117, which are notrun without it)."""
    if fs not in FILESYSTEMS:
        raise errors.BadArgument(what=f"unknown base filesystem {fs!r}", fix=f"use {', '.join(FILESYSTEMS)}")
    lines = [f"export FSTYP={fs}", f"export TEST_DEV={test_dev}", f"export TEST_DIR={TEST_DIR}",
             f"export SCRATCH_DEV={scratch_dev}", f"export SCRATCH_MNT={SCRATCH_MNT}",
             f"export RESULT_BASE={RESULT_BASE}/{fs}"]
    if mount_options:
        opts = ",".join(o.strip() for o in mount_options.split(",") if o.strip())
        lines.append(f'export OVERLAY_MOUNT_OPTIONS="-o {opts}"')
    if unionmount:
        lines.append(f"export UNIONMOUNT_TESTSUITE={unionmount}")
    return "# written by ovl-volatile-harness (vm/suites/fstests.py)\n" + "\n".join(lines) + "\n"


def prepare_argv(fs: str, test_dev: str, scratch_dev: str) -> list[str]:
    """Fresh base filesystems (``-overlay`` does not mkfs them) and fstests' users."""
    force = "-f" if fs == "xfs" else "-F"
    script = ["set -e", f"umount -R {SCRATCH_MNT} {TEST_DIR} 2>/dev/null || true",
              f"mkdir -p {TEST_DIR} {SCRATCH_MNT} {RESULT_BASE}/{fs}",
              f"mkfs.{fs} -q {force} {test_dev}", f"mkfs.{fs} -q {force} {scratch_dev}",
              *USERS_SCRIPT, *UDEVSETTLE_SCRIPT]
    return ["sh", "-c", "\n".join(script)]


def mounted_under(g: Runs, roots: Iterable[str] = (TEST_DIR, SCRATCH_MNT)) -> list[str]:
    """The guest's mounts at or under ``roots``, in the order to unmount them: deepest
    first, the later of two stacked on one point first."""
    found = leftover_mounts(g.run(["cat", "/proc/mounts"], check=True).stdout, roots)
    return sorted(reversed(found), key=lambda p: -p.count("/"))


def release_mounts(g: Runs, fs: str) -> None:
    """Before fstests on ``fs`` in a guest that ran it on another fs: kill whatever
    still uses the test and scratch mounts (``fuser -km``), unmount them (overlays
    first), and check none is left, so the next fs starts clean."""
    for point in mounted_under(g):
        g.run(["fuser", "-km", point], timeout=60)          # exits 1 when nobody used it
        g.run(["umount", point], timeout=120)
    left = mounted_under(g)
    if left:
        raise errors.FstestsMountsBusy(mounts=", ".join(left), fs=fs)


# --- results ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckLog:
    """What ``check.log`` says: the tests run, not run and failed."""

    ran: tuple[str, ...] = ()
    notrun: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()


def parse_check_log(text: str) -> CheckLog:
    found: dict[str, list[str]] = {"Ran": [], "Not run": [], "Failures": []}
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        if sep and head.strip() in found:
            found[head.strip()] += rest.split()
    return CheckLog(tuple(found["Ran"]), tuple(found["Not run"]), tuple(found["Failures"]))


@dataclass(frozen=True)
class TestResult:
    __test__ = False        # not a pytest test class

    test: str
    outcome: str            # passed | failed | notrun
    message: str = ""
    seconds: float = 0.0


def parse_xunit(text: str) -> list[TestResult]:
    """fstests' ``-R xunit`` ``result.xml``: one :class:`TestResult` per testcase."""
    import xml.etree.ElementTree as ET

    found = []
    for case in ET.fromstring(text).iter("testcase"):
        outcome, message = PASSED, ""
        if case.find("skipped") is not None:
            outcome, message = NOTRUN, case.find("skipped").get("message", "") or ""
        elif case.find("failure") is not None or case.find("error") is not None:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            outcome, message = FAILED, node.get("message", "") or ""
        found.append(TestResult(case.get("name", ""), outcome, message.strip(),
                                float(case.get("time") or 0)))
    return found


# --- known failures and the regression diff --------------------------------------------

@dataclass(frozen=True)
class Known:
    test: str
    reason: str
    filesystems: tuple[str, ...] = ()   # empty: every fs
    variants: tuple[str, ...] = ()      # empty: every variant

    def covers(self, test: str, fs: str, variant: str) -> bool:
        return (test == self.test and (not self.filesystems or fs in self.filesystems)
                and (not self.variants or variant in self.variants))


@dataclass(frozen=True)
class KnownFailures:
    """``tests/fstests/known-failures/<base>.json``: failures with a reason, and the tests
    whose outcome per variant is fixed (the series' own test: notrun on B, passed on P)."""

    failures: tuple[Known, ...] = ()
    expect: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "KnownFailures":
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise errors.ExpectationError(detail=f"{path}: not JSON ({exc})") from None
        return cls.from_data(data, str(path))

    @classmethod
    def from_data(cls, data: Mapping, source: str = "<data>") -> "KnownFailures":
        failures = []
        for item in data.get("failures", []):
            if not str(item.get("reason", "")).strip() or not item.get("test"):
                raise errors.ExpectationError(detail=f"{source}: known failure {item!r} has no test or no reason")
            failures.append(Known(item["test"], item["reason"].strip(), tuple(item.get("fs", ())),
                                  tuple(item.get("variants", ()))))
        expect = {}
        for test, outcomes in data.get("expect", {}).items():
            if not str(outcomes.get("reason", "")).strip():
                raise errors.ExpectationError(detail=f"{source}: expected outcome of {test} has no reason")
            bad = {v: o for v, o in outcomes.items() if v != "reason" and o not in (PASSED, FAILED, NOTRUN)}
            if bad:
                raise errors.ExpectationError(detail=f"{source}: {test}: outcomes {bad} are not "
                                                     f"{PASSED}, {FAILED} or {NOTRUN}")
            expect[test] = dict(outcomes)
        return cls(tuple(failures), expect)

    def reason(self, test: str, fs: str, variant: str) -> str | None:
        for known in self.failures:
            if known.covers(test, fs, variant):
                return known.reason
        return None


@dataclass(frozen=True)
class Diff:
    """P against B on one fs: what fails the run and what is only listed."""

    fs: str
    regressions: tuple[str, ...] = ()       # passed (or notrun) on B, failed on P, not known
    unexpected: tuple[str, ...] = ()        # a fixed expectation (known-failures "expect") not met
    pre_existing: tuple[str, ...] = ()      # failed on both
    known: tuple[str, ...] = ()             # failed, listed in the known failures (with reason)
    fixed: tuple[str, ...] = ()             # failed on B, passed on P
    notrun: tuple[str, ...] = ()            # "test (variant): reason"
    missing: tuple[str, ...] = ()           # ran on one kernel only

    @property
    def ok(self) -> bool:
        return not (self.regressions or self.unexpected or self.missing)


def regression_diff(fs: str, base: Mapping[str, TestResult], patched: Mapping[str, TestResult],
                    known: KnownFailures, labels: tuple[str, str] = ("baseline", "patched")) -> Diff:
    """Compare the outcomes of the same tests on B and P (one fs)."""
    out: dict[str, list[str]] = {k: [] for k in ("regressions", "unexpected", "pre_existing", "known",
                                                "fixed", "notrun", "missing")}
    for test in sorted(set(base) | set(patched)):
        b, p = base.get(test), patched.get(test)
        if b is None or p is None:
            out["missing"].append(f"{test} (not run on {labels[0] if b is None else labels[1]})")
            continue
        for label, r in zip(labels, (b, p)):
            if r.outcome == NOTRUN:
                out["notrun"].append(f"{test} ({label}): {r.message or 'no reason given'}")
        _judge(test, fs, b, p, known, labels, out)
    return Diff(fs, **{k: tuple(v) for k, v in out.items()})


def _judge(test: str, fs: str, b: TestResult, p: TestResult, known: KnownFailures,
           labels: tuple[str, str], out: dict[str, list[str]]) -> None:
    fixed = known.expect.get(test)
    if fixed is not None:
        # the second kernel is judged as the full series (a prefix or a mutation must match it)
        wanted = {labels[0]: fixed.get("baseline"), labels[1]: fixed.get("patched")}
        wrong = [f"{label} {r.outcome}, expected {wanted[label]}" for label, r in zip(labels, (b, p))
                 if wanted[label] and r.outcome != wanted[label]]
        if wrong:
            out["unexpected"].append(f"{test}: {'; '.join(wrong)} ({fixed['reason']})")
        return
    if p.outcome == FAILED:
        reason = known.reason(test, fs, labels[1])
        if reason:
            out["known"].append(f"{test}: {reason}")
        elif b.outcome == FAILED:
            out["pre_existing"].append(f"{test}: {p.message or b.message}")
        else:
            out["regressions"].append(f"{test}: {b.outcome} on {labels[0]}, failed on {labels[1]}: {p.message}")
    elif b.outcome == FAILED and p.outcome == PASSED:
        out["fixed"].append(test)


def section_title(groups: Sequence[str], filesystems: Sequence[str]) -> str:
    """A run's section in matrix.md, and its key in a merge: the main tier's tests and each
    full-tier shard's groups on its fs are sections of their own, never one overwriting another."""
    return "fstests -overlay" + (f" -g {','.join(groups)}" if groups else "") + f" on {', '.join(filesystems)}"


def render_diff(diffs: Iterable[Diff], title: str = "fstests -overlay: patched vs baseline") -> str:
    lines = [f"## {title}", ""]
    for d in diffs:
        lines.append(f"### base fs {d.fs}: {'OK' if d.ok else 'REGRESSION'}")
        for name in ("regressions", "unexpected", "missing", "known", "pre_existing", "fixed", "notrun"):
            items = getattr(d, name)
            if items:
                lines.append(f"- {name.replace('_', '-')} ({len(items)}):")
                lines += [f"  - {item}" for item in items]
        lines.append("")
    return "\n".join(lines)


# --- the verdict of one session ----------------------------------------------------------

def case_key(name: str) -> tuple[str, str, str] | None:
    """``test_fstests[overlay/118-xfs-patched]`` -> ``("overlay/118", "xfs", "patched")``."""
    inner = name.partition("[")[2].rstrip("]")
    for fs in FILESYSTEMS:
        test, sep, variant = inner.partition(f"-{fs}-")
        if sep and test and variant:
            return test, fs, variant
    return None


def from_case(test: str, outcome: str, message: str) -> TestResult:
    """A pytest case's outcome as fstests' words: a skip is a notrun, an error a failure."""
    if outcome == "skipped":
        return TestResult(test, NOTRUN, message.removeprefix("notrun: "))
    return TestResult(test, PASSED if outcome == "passed" else FAILED, message)


@dataclass(frozen=True)
class Verdict:
    """Every (variant, fs)'s results and, where B and P both ran, the regression diff."""

    results: Mapping[tuple[str, str], Mapping[str, TestResult]]
    diffs: tuple[Diff, ...] = ()
    problems: tuple[str, ...] = ()     # failures the diff does not cover (one kernel only, no case)

    @property
    def ok(self) -> bool:
        return not self.problems and all(d.ok for d in self.diffs)

    def summary(self) -> str:
        parts = []
        for (variant, fs), tests in sorted(self.results.items()):
            tally: dict[str, int] = {}
            for r in tests.values():
                tally[r.outcome] = tally.get(r.outcome, 0) + 1
            parts.append(f"{variant}-{fs}: " + ", ".join(f"{n} {o}" for o, n in sorted(tally.items())))
        return "; ".join(parts) or "no test ran"

    def render(self, title: str, base: str) -> str:
        lines = [f"## {title} (base {base})", "", f"{self.summary()}", ""]
        lines += [f"- PROBLEM: {p}" for p in self.problems]
        if self.problems:
            lines.append("")
        text = "\n".join(lines)
        if self.diffs:
            text += "\n" + render_diff(self.diffs, "patched vs baseline").replace("## ", "### ", 1)
        return text

    def write(self, results_dir: Path, matrix_md: Path, base: str, title: str = "fstests -overlay") -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        text = self.render(title, base)
        (results_dir / "report.md").write_text(text + "\n")
        report.merge_section(matrix_md, title, text)
        return results_dir / "report.md"


def judge(cases: Iterable, known: KnownFailures, labels: list[str], filesystems: Iterable[str],
          returncode: int = 0, baseline: str = "baseline", patched: str = "patched") -> Verdict:
    """``cases`` (:class:`vm.suites.junit.Case`) of one fstests session -> the verdict."""
    results: dict[tuple[str, str], dict[str, TestResult]] = {}
    problems = []
    for case in cases:
        key = case_key(case.name)
        if key is None:
            problems.append(f"{case.name}: {case.outcome} {case.message}".strip())
            continue
        test, fs, variant = key
        results.setdefault((variant, fs), {})[test] = from_case(test, case.outcome, case.message)
    if not results:
        problems.append(f"no fstests case ran (pytest exited {returncode})")
    if baseline in labels and len(labels) == 2:
        patched = next(label for label in labels if label != baseline)   # e.g. a mutation, prefix-3
    diffs = []
    for fs in filesystems:
        b, p = results.get((baseline, fs)), results.get((patched, fs))
        if b is not None and p is not None:
            diffs.append(regression_diff(fs, b, p, known, (baseline, patched)))
            continue
        for variant in labels:
            for r in results.get((variant, fs), {}).values():
                if r.outcome == FAILED and not known.reason(r.test, fs, variant):
                    problems.append(f"{r.test} failed on {fs} ({variant}): {r.message}")
    return Verdict(results, tuple(diffs), tuple(problems))


# --- unionmount-testsuite ------------------------------------------------------------------

#: the runs, as pytest ids -> ./run arguments (README: "If testing overlayfs ...")
UNIONMOUNT_RUNS = {"ov-verify": ("--ov", "--verify"), "ov-samefs": ("--ov", "--samefs")}
#: where ./run mounts (its defaults): cleaned up after each run, and checked
UNIONMOUNT_ROOTS = ("/lower", "/upper", "/base", "/mnt")


def unionmount_argv(mode: str) -> list[str]:
    if mode not in UNIONMOUNT_RUNS:
        raise errors.BadArgument(what=f"unknown unionmount-testsuite run {mode!r}",
                                 fix=f"use {', '.join(UNIONMOUNT_RUNS)}")
    args = " ".join(UNIONMOUNT_RUNS[mode])
    return ["sh", "-c", f"mkdir -p {' '.join(UNIONMOUNT_ROOTS)} && cd {UNIONMOUNT_DIR} && exec ./run {args}"]


def leftover_mounts(proc_mounts: str, roots: Iterable[str] = UNIONMOUNT_ROOTS) -> list[str]:
    """Mount points in ``/proc/mounts`` text at or under ``roots``."""
    found = []
    for line in proc_mounts.splitlines():
        fields = line.split()
        if len(fields) > 1 and any(fields[1] == r or fields[1].startswith(r + "/") for r in roots):
            found.append(fields[1])
    return found


def unmount_argv(points: Iterable[str]) -> list[str]:
    """Unmount ``points``, deepest first (a stack of overlays comes off top down)."""
    ordered = sorted(set(points), key=lambda p: (-p.count("/"), p))
    return ["sh", "-c", "for m in \"$@\"; do umount -l \"$m\" 2>/dev/null; done; true", "sh", *ordered]
