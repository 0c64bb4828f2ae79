"""Run a pytest suite (on booted kernels or none) and read its JUnit: the one owner of that job.

Every caller that runs tests and judges them, `invoke unit/test/matrix/ci`,
`invoke mutation` and each step of `invoke bisect`, describes the run as a
:class:`SuiteRequest` and gets a :class:`SuiteResult` back: the exit code
and every case of the JUnit file as :class:`~vm.suites.junit.Case`, so a
failed assertion is never confused with a setup error or a skip.

Where the tests live is configuration (``ovl.suites`` in ``invoke.yaml``,
:class:`~vm.settings.SuitePaths`), never a path written into the library.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from vm import errors, runner
from vm.suites import junit


def _frozen(mapping: Mapping[str, tuple[str, ...]] | None = None) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({k: tuple(v) for k, v in (mapping or {}).items()})


@dataclass(frozen=True)
class SuiteRequest:
    """One pytest session: which tests, on which kernels, and where its results go."""

    name: str                                   # results file stem: <results_dir>/<name>.xml
    tests: tuple[str, ...]                      # pytest paths, relative to the project root
    results_dir: Path
    kernels: tuple[tuple[str, Path], ...] = ()  # (variant label, build dir), e.g. ("patched@6.1", ...)
    image: Path | None = None                   # guest root image for the kernels
    rows_for: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen)
    filesystems: tuple[str, ...] = ()           # only these upper filesystems (default: every one)
    keyword: str | None = None                  # pytest -k
    markers: str | None = None                  # pytest -m
    keep_vm: bool = False
    options: tuple[str, ...] = ()               # further pytest options, e.g. "--require-inputs"
    log: Path | None = None                     # output into this file instead of the terminal
    show: Callable[[str], bool] | None = None   # with ``log``: the lines still shown

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows_for", _frozen(self.rows_for))

    @property
    def xml(self) -> Path:
        return self.results_dir / f"{self.name}.xml"

    def argv(self, python: str = sys.executable) -> list[str]:
        argv = [python, "-m", "pytest", *self.tests, f"--junitxml={self.xml}"]
        for label, build_dir in self.kernels:
            argv += ["--kernel", f"{label}={build_dir}"]
        if self.image is not None:
            argv += ["--image", str(self.image)]
        for variant, rows in self.rows_for.items():
            argv += ["--rows-for", f"{variant}={','.join(rows)}"]
        for fs in self.filesystems:
            argv += ["--fs", fs]
        if self.keyword:
            argv += ["-k", self.keyword]
        if self.markers:
            argv += ["-m", self.markers]
        if self.keep_vm:
            argv.append("--keep-vm")
        if self.log is not None:
            argv += ["-q", "-p", "no:cacheprovider"]
        return argv + list(self.options)


@dataclass(frozen=True)
class SuiteResult:
    request: SuiteRequest
    returncode: int
    cases: tuple[junit.Case, ...]

    def named(self, outcome: str) -> list[str]:
        return sorted(c.name for c in self.cases if c.outcome == outcome)

    def counts(self) -> str:
        tally = Counter(c.outcome for c in self.cases)
        return ", ".join(f"{n} {o}" for o, n in sorted(tally.items())) or "no test ran"

    @property
    def passed(self) -> bool:
        """pytest exited 0 and its JUnit file holds at least one case and no failure or error."""
        return (self.returncode == 0 and bool(self.cases)
                and not any(c.outcome in ("failed", "error") for c in self.cases))

    def check(self) -> "SuiteResult":
        if not self.passed:
            raise errors.SuiteFailed(name=self.request.name, rc=self.returncode, counts=self.counts(),
                                     failing=", ".join((self.named("failed") + self.named("error"))[:6]) or "-",
                                     xml=self.request.xml)
        return self


def run(project_root: Path, req: SuiteRequest, env: Mapping[str, str] | None = None) -> SuiteResult:
    """Run the session; its results (JUnit, matrix, console logs) land in ``req.results_dir``."""
    req.results_dir.mkdir(parents=True, exist_ok=True)
    req.xml.unlink(missing_ok=True)     # never read a previous session's verdicts
    env = {"INVOKE_OVL_RESULTS_DIR": str(req.results_dir), **(env or {})}
    argv = req.argv()
    if req.log is not None:
        rc = runner.run_logged(argv, req.log, cwd=project_root, env=env,
                               show=req.show or (lambda line: False))
    else:
        rc = runner.run(argv, cwd=project_root, capture=False, check=False, env=env).returncode
    cases = tuple(junit.cases(req.xml)) if req.xml.is_file() else ()
    return SuiteResult(req, rc, cases)
