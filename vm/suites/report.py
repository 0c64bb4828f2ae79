"""The scenario matrix: (row, fs, variant) -> actual, expected, pass/fail.

Scenario tests record into a :class:`Matrix` (see tests/scenarios/conftest.py);
at the end of the session it is rendered with Jinja2 to ``matrix.md`` and
``matrix.html`` in the results directory, and the Markdown is printed.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: the matrix as data, beside matrix.md and matrix.html: what `invoke report --merge` reads
MATRIX_JSON = "matrix.json"
#: the accelerator each variant's guest used, for a suite without a matrix (fstests, unionmount)
ACCEL_JSON = "accel.json"
PASS, FAIL, ERROR, SKIPPED, NOT_RUN = "pass", "fail", "error", "skipped", "not run"


@dataclass
class Step:
    step: str
    actual: str
    expected: str
    ok: bool
    detail: str = ""


@dataclass
class Case:
    """One scenario run: a row of SCENARIOS.md on one filesystem and kernel variant."""

    nodeid: str
    row: str
    fs: str
    variant: str
    expected: str = "?"
    actual: str = "-"
    behaviour: str = ""
    status: str = NOT_RUN
    message: str = ""
    steps: list[Step] = field(default_factory=list)
    duration: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.row}[{self.fs}-{self.variant}]"

    @property
    def short_message(self) -> str:
        prefix = f"{self.label}: "
        return self.message[len(prefix):] if self.message.startswith(prefix) else self.message

    @property
    def cell(self) -> str:
        """Short text for a matrix cell."""
        if self.status == PASS:
            return f"✓ {self.actual}"
        if self.status == FAIL:
            if self.actual not in ("-", self.expected):
                return f"✗ {self.actual} (expected {self.expected})"
            return f"✗ {self.actual} (see failures)"
        if self.status == ERROR:
            return "✗ error"
        return f"– {self.status}"


@dataclass
class VariantTime:
    seconds: float = 0.0     # setup + call + teardown of its scenarios (boots included)
    boot_seconds: float = 0.0
    first: float | None = None
    last: float | None = None

    @property
    def wall(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        return self.last - self.first


class Matrix:
    """``rows``: the row order; ``extra``: the rows beyond SCENARIOS.md (id -> why),
    shown after the others and marked as extra."""

    def __init__(self, rows: Iterable[str] = (), filesystems: Iterable[str] = (),
                 extra: Mapping[str, str] | None = None) -> None:
        self.row_order = list(rows)
        self.fs_order = list(filesystems)
        self.extra: dict[str, str] = dict(extra or {})
        self.cases: dict[str, Case] = {}
        self.times: dict[str, VariantTime] = {}
        self.accel: dict[str, str] = {}      # variant -> "tcg: why" of its guest
        self.results_dir: Path | None = None
        self.started = _dt.datetime.now().replace(microsecond=0)

    # --- collecting --------------------------------------------------------
    def add_case(self, nodeid: str, row: str, fs: str, variant: str) -> Case:
        case = self.cases.get(nodeid)
        if case is None:
            case = self.cases[nodeid] = Case(nodeid, row, fs, variant)
        if row not in self.row_order:
            self.row_order.append(row)
        if fs not in self.fs_order:
            self.fs_order.append(fs)
        self.times.setdefault(variant, VariantTime())
        return case

    def record(self, nodeid: str, *, expected: str, actual: str, behaviour: str = "",
               steps: Iterable = (), message: str = "") -> Case:
        case = self.cases[nodeid]
        case.expected, case.actual, case.behaviour = expected, actual, behaviour
        case.steps = [s if isinstance(s, Step) else Step(s.step, s.actual, s.expected, s.ok,
                                                          getattr(s, "detail", ""))
                      for s in steps]
        if message:
            case.message = message
        return case

    def report(self, nodeid: str, when: str, outcome: str, duration: float,
               message: str = "", start: float | None = None, stop: float | None = None) -> None:
        """Feed one pytest report phase (setup/call/teardown) of a registered case."""
        case = self.cases.get(nodeid)
        if case is None:
            return
        case.duration += duration
        t = self.times.setdefault(case.variant, VariantTime())
        t.seconds += duration
        if start is not None:
            t.first = start if t.first is None else min(t.first, start)
        if stop is not None:
            t.last = stop if t.last is None else max(t.last, stop)
        if when == "call":
            if outcome == "passed":
                case.status = PASS
            elif outcome == "failed":
                case.status = FAIL
                case.message = case.message or message
            elif outcome == "skipped":
                case.status = SKIPPED
                case.message = message
        elif outcome == "failed":       # setup or teardown broke
            if case.status in (NOT_RUN, PASS):
                case.status = ERROR
                case.message = f"{when}: {message}"
        elif outcome == "skipped" and when == "setup":
            case.status, case.message = SKIPPED, message

    def add_boot(self, variant: str, seconds: float, accel: str = "") -> None:
        self.times.setdefault(variant, VariantTime()).boot_seconds += seconds
        if accel:
            self.accel[variant] = accel

    # --- saving (a shard's matrix, read back by vm.suites.merge) ----------------
    def to_dict(self) -> dict:
        return {"rows": self.row_order, "filesystems": self.fs_order, "started": self.started.isoformat(),
                "accel": self.accel, "times": {v: asdict(t) for v, t in self.times.items()},
                "cases": [{**asdict(c), "steps": [asdict(s) for s in c.steps]} for c in self.cases.values()]}

    @classmethod
    def from_dict(cls, data: dict) -> "Matrix":
        m = cls(data.get("rows", ()), data.get("filesystems", ()))
        m.started = _dt.datetime.fromisoformat(data["started"]) if data.get("started") else m.started
        m.accel = dict(data.get("accel", {}))
        m.times = {v: VariantTime(**t) for v, t in data.get("times", {}).items()}
        for c in data.get("cases", ()):
            m.cases[c["nodeid"]] = Case(**{**c, "steps": [Step(**s) for s in c.get("steps", ())]})
        return m

    # --- views -------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        seen: list[str] = []
        for case in self.cases.values():
            if case.variant not in seen:
                seen.append(case.variant)
        return seen

    @property
    def columns(self) -> list[tuple[str, str]]:
        present = {(c.variant, c.fs) for c in self.cases.values()}
        return [(v, fs) for v in self.variants for fs in self.fs_order if (v, fs) in present]

    @property
    def rows(self) -> list[str]:
        """The rows that have cases: SCENARIOS.md's, then the extra ones."""
        present = {c.row for c in self.cases.values()}
        ordered = sorted(self.row_order, key=lambda r: r in self.extra)   # stable
        return [r for r in ordered if r in present]

    @property
    def extra_rows(self) -> list[str]:
        """The extra rows that have cases, in order."""
        return [r for r in self.rows if r in self.extra]

    def cell(self, row: str, variant: str, fs: str) -> Case | None:
        for case in self.cases.values():
            if (case.row, case.variant, case.fs) == (row, variant, fs):
                return case
        return None

    def counts(self, variant: str | None = None) -> dict[str, int]:
        out = {PASS: 0, FAIL: 0, ERROR: 0, SKIPPED: 0, NOT_RUN: 0}
        for case in self.cases.values():
            if variant is None or case.variant == variant:
                out[case.status] += 1
        return out

    @property
    def failures(self) -> list[Case]:
        return [c for c in self.cases.values() if c.status in (FAIL, ERROR)]

    # --- rendering -----------------------------------------------------------
    def _env(self, autoescape: bool) -> jinja2.Environment:
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                                 autoescape=autoescape, trim_blocks=True, lstrip_blocks=True,
                                 keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
        env.filters["md"] = _md_cell
        env.filters["secs"] = lambda s: "-" if s is None else f"{s:.1f}"
        env.filters["variant"] = variant_title
        return env

    def _context(self) -> dict:
        return {"m": self, "rows": self.rows, "extra": self.extra_rows, "columns": self.columns,
                "variants": self.variants,
                "times": self.times, "failures": self.failures, "total": self.counts(),
                "started": self.started.isoformat(sep=" ")}

    def render_markdown(self) -> str:
        return self._env(False).get_template("matrix.md.j2").render(**self._context())

    def render_html(self) -> str:
        return self._env(True).get_template("matrix.html.j2").render(**self._context())

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in (("matrix.md", self.render_markdown()), ("matrix.html", self.render_html()),
                           (MATRIX_JSON, json.dumps(self.to_dict(), indent=1) + "\n")):
            path = directory / name
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
            written.append(path)
        return written[0], written[1]

    def status_cells(self) -> dict[tuple[str, str, str], tuple[str, str]]:
        """``{(row, fs, variant): (status, actual)}``: what two runs of the same matrix must agree on."""
        return {(c.row, c.fs, c.variant): (c.status, c.actual) for c in self.cases.values()}


def accel_label(accel) -> str:
    """``tcg (why)``: how a guest's accelerator (a :class:`vm.machine.qemu.Accel`) is reported."""
    return f"{accel.name} ({accel.reason})"


def record_accel(directory: Path, variant: str, label: str) -> None:
    """Add ``variant``'s accelerator to ``directory``/accel.json (written whole, then renamed)."""
    path = Path(directory) / ACCEL_JSON
    seen = json.loads(path.read_text()) if path.is_file() else {}
    seen[variant] = label
    tmp = path.with_name(f".{ACCEL_JSON}.tmp")
    tmp.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def variant_title(variant: str) -> str:
    """``patched@6.1`` (a version-matrix column) -> ``6.1 patched``."""
    name, _, base = variant.partition("@")
    return f"{base} {name}" if base else name


def _md_cell(text: object) -> str:
    """Make text safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def merge_section(path: Path, key: str, text: str) -> None:
    """Put ``text`` into the Markdown report ``path`` as the section ``key`` (replacing
    an earlier one), so the matrix report has a section per suite."""
    begin, end = f"<!-- suite: {key} -->", f"<!-- end suite: {key} -->"
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        old = head.rstrip("\n") + rest.partition(end)[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((old.rstrip("\n") + "\n\n" if old.strip() else "") + f"{begin}\n{text.rstrip()}\n{end}\n")


_SECTION = re.compile(r"<!-- suite: (?P<key>.+?) -->\n(?P<body>.*?)\n<!-- end suite: (?P=key) -->", re.S)


def suite_sections(text: str) -> dict[str, str]:
    """The sections :func:`merge_section` wrote into a report, key -> text (a shard's
    ``matrix.md`` -> the merged one)."""
    return {m["key"]: m["body"] for m in _SECTION.finditer(text)}
