"""Join the results of several CI shards into one matrix and one JUnit file.

Each shard (``invoke ci --shard NAME``, see :mod:`vm.ci`) leaves a directory
with its manifest (``shard.json``: the plan it belongs to, every shard of that
plan, its phases and their outcomes, the accelerator), its JUnit files and its
``matrix.json``.  :func:`merge` reads any number of them, from one machine or
copied from several, and writes ``matrix.md``/``.html``/``.json`` (one per
matrix kind: the scenarios, the version matrix in ``matrix/``), ``junit.xml``
and ``summary.md``.  It refuses a merge with a shard missing or unfinished, or
with a cell (a scenario, a test case, a phase) run twice with different outcomes.
"""

from __future__ import annotations

import copy
import glob
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from vm import errors
from vm.suites import junit, report
from vm.suites.report import ACCEL_JSON, MATRIX_JSON, NOT_RUN, Matrix, variant_title

MANIFEST = "shard.json"
JUNIT = "junit.xml"
SUMMARY = "summary.md"


@dataclass(frozen=True)
class ShardResults:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["shard"]

    @classmethod
    def load(cls, path: Path) -> "ShardResults":
        try:
            return cls(Path(path), json.loads((Path(path) / MANIFEST).read_text()))
        except (OSError, ValueError) as exc:
            raise errors.NotAShard(path=path, manifest=MANIFEST) from exc

    def matrices(self) -> dict[str, Matrix]:
        """``{"": the scenario matrix, "matrix": the version matrix}``: by their dir under the shard."""
        found = {}
        for path in sorted(self.path.rglob(MATRIX_JSON)):
            kind = "" if path.parent == self.path else str(path.parent.relative_to(self.path))
            found[kind] = Matrix.from_dict(json.loads(path.read_text()))
        return found


def expand(patterns: list[str]) -> list[Path]:
    """Directories named or matched by glob patterns (``results/shards/*``), comma lists too.

    A glob matches directories only: ``invoke ci`` in lanes leaves its per-shard logs and
    its plan file (``<shard>.log``, ``lanes.json``) beside the shard dirs."""
    out: list[Path] = []
    for item in (p.strip() for pat in patterns for p in pat.split(",")):
        if item:
            out += ([Path(p) for p in sorted(glob.glob(item)) if Path(p).is_dir()] if glob.has_magic(item)
                    else [Path(item)])
    return out


def matrix_accels(directory: Path) -> list[str]:
    """``["patched: tcg (why)", ...]`` from every matrix a shard wrote, and every suite's
    ``accel.json`` (fstests and unionmount boot guests too, without a matrix)."""
    seen: list[str] = []
    found = [(p, json.loads(p.read_text()).get("accel", {})) for p in Path(directory).rglob(MATRIX_JSON)]
    found += [(p, json.loads(p.read_text())) for p in Path(directory).rglob(ACCEL_JSON)]
    for _, accels in sorted(found, key=lambda item: item[0]):
        for variant, accel in accels.items():
            line = f"{variant_title(variant)}: {accel}"
            if line not in seen:
                seen.append(line)
    return seen


@dataclass
class Merged:
    shards: list[ShardResults]
    matrices: dict[str, Matrix] = field(default_factory=dict)
    cases: dict[tuple, tuple[str, ET.Element]] = field(default_factory=dict)   # key -> (outcome, <testcase>)
    suites: dict[str, list[tuple]] = field(default_factory=dict)               # suite name -> keys
    conflicts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)   # a suite's report section of matrix.md

    @property
    def failed(self) -> list[str]:
        return sorted({s.name for s in self.shards if s.manifest.get("status") == "failed"})

    def counts(self) -> dict[str, int]:
        tally = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for outcome, _ in self.cases.values():
            tally[outcome] = tally.get(outcome, 0) + 1
        return tally


def _add_case(m: Merged, suite: str, key: tuple, node: ET.Element, label: str) -> None:
    outcome = junit.case_of(node).outcome
    if key in m.cases:
        if m.cases[key][0] != outcome:
            m.conflicts.append(f"{label} ({m.cases[key][0]} and {outcome})")
        return
    m.cases[key] = (outcome, node)
    m.suites.setdefault(suite, []).append(key)


def _phase_case(shard: str, phase: dict) -> ET.Element:
    node = ET.Element("testcase", classname=f"ci.{shard}", name=phase["title"], time=str(phase["seconds"]))
    if phase["outcome"] == "failed":
        ET.SubElement(node, "failure", message=phase.get("message", "")[:500])
    elif phase["outcome"] != "passed":
        ET.SubElement(node, "skipped", message=f"{phase['outcome']}: an earlier phase of the shard failed")
    return node


def _collect_junit(m: Merged, sh: ShardResults) -> None:
    for phase in sh.manifest.get("phases", ()):
        _add_case(m, "ci phases", ("phase", sh.name, phase["title"]), _phase_case(sh.name, phase),
                  f"phase {sh.name}: {phase['title']}")
    for name in sh.manifest.get("junit", ()):
        path = sh.path / name
        if not path.is_file():
            m.conflicts.append(f"{sh.name}: {name} listed in its manifest but absent")
            continue
        for node in ET.parse(path).getroot().iter("testcase"):
            key = (name, node.get("classname", ""), node.get("name", ""))
            _add_case(m, name.removesuffix(".xml"), key, node, f"{name}: {key[1]}::{key[2]}")


def _collect_matrix(m: Merged, kind: str, matrix: Matrix, shard: str) -> None:
    into = m.matrices.setdefault(kind, Matrix(matrix.row_order, matrix.fs_order))
    into.started = min(into.started, matrix.started)
    cells = {(c.row, c.fs, c.variant): c for c in into.cases.values()}
    for case in matrix.cases.values():
        had = cells.get((case.row, case.fs, case.variant))
        if had is not None and had.status != NOT_RUN:
            if case.status != NOT_RUN and (had.status, had.actual) != (case.status, case.actual):
                m.conflicts.append(f"{case.label} in {shard} ({had.cell} and {case.cell})")
            continue
        if had is not None:
            del into.cases[had.nodeid]
        into.add_case(case.nodeid, case.row, case.fs, case.variant)     # keeps row and fs order
        into.cases[case.nodeid] = copy.deepcopy(case)
    for variant, t in matrix.times.items():
        mine = into.times.setdefault(variant, type(t)())
        mine.seconds += t.seconds
        mine.boot_seconds += t.boot_seconds
        mine.first = t.first if mine.first is None else min(mine.first, t.first or mine.first)
        mine.last = t.last if mine.last is None else max(mine.last, t.last or mine.last)
    into.accel.update({v: a for v, a in matrix.accel.items() if v not in into.accel})


def collect(dirs: list[Path]) -> Merged:
    """Read every shard dir; nothing is written and nothing raised for missing shards yet."""
    shards = [ShardResults.load(d) for d in dirs]
    if not shards:
        raise errors.BadArgument(what="no shard directory given", fix="pass --merge DIR (repeatable, globs allowed)")
    plans = sorted({s.manifest.get("plan", "?") for s in shards})
    if len(plans) > 1:
        raise errors.MixedPlans(plans=", ".join(
            f"{p}: {', '.join(s.name for s in shards if s.manifest.get('plan') == p)}" for p in plans))
    expected = shards[0].manifest.get("shards", [])
    # the plan's order, whatever order the dirs came in: the same merge, the same matrix
    shards.sort(key=lambda s: expected.index(s.name) if s.name in expected else len(expected))
    m = Merged(shards)
    present = {s.name for s in shards}
    m.missing = [name for name in expected if name not in present]
    m.unfinished = sorted({s.name for s in shards if s.manifest.get("status") not in ("passed", "failed")})
    for sh in shards:
        _collect_junit(m, sh)
        for kind, matrix in sh.matrices().items():
            _collect_matrix(m, kind, matrix, sh.name)
        md = sh.path / "matrix.md"      # the suites' sections (fstests, unionmount-testsuite)
        m.sections.update(report.suite_sections(md.read_text()) if md.is_file() else {})
    return m


def write_junit(m: Merged, path: Path) -> Path:
    root = ET.Element("testsuites", name="ovl-volatile-harness ci")
    for suite, keys in m.suites.items():
        nodes = [m.cases[k] for k in keys]
        el = ET.SubElement(root, "testsuite", name=suite, tests=str(len(nodes)),
                           failures=str(sum(o == "failed" for o, _ in nodes)),
                           errors=str(sum(o == "error" for o, _ in nodes)),
                           skipped=str(sum(o == "skipped" for o, _ in nodes)),
                           time=f"{sum(float(n.get('time') or 0) for _, n in nodes):.3f}")
        el.extend(copy.deepcopy(n) for _, n in nodes)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(path)
    return path


def summary(m: Merged) -> str:
    """Markdown for a CI job summary: shards, phases and times, accelerators, JUnit counts, the matrices."""
    head = m.shards[0].manifest
    lines = [f"# CI results ({head.get('tier', '?')} tier, plan {head.get('plan', '?')})", "",
             "| shard | base | status | time (s) | host | accelerator |", "|---|---|---|---|---|---|"]
    for sh in m.shards:
        mf = sh.manifest
        lines.append(f"| {sh.name} | {mf.get('base') or '-'} | {mf.get('status')} | {mf.get('seconds', 0):.0f} "
                     f"| {mf.get('host', '?')} | {_cell(mf.get('accel', ''))} |")
    if len(m.shards) > 1:       # one shard's own summary does not list the others as missing
        lines += [f"| {name} | | **missing** | | | |" for name in m.missing]
    lines += ["", "| shard | phase | outcome | time (s) |", "|---|---|---|---|"]
    for sh in m.shards:
        lines += [f"| {sh.name} | {_cell(p['title'])} | {p['outcome']} | {p['seconds']:.0f} |"
                  for p in sh.manifest.get("phases", ())]
    tally = m.counts()
    lines += ["", "JUnit: " + ", ".join(f"{n} {o}" for o, n in tally.items() if n), ""]
    bad = [(k, n) for k, (o, n) in m.cases.items() if o in ("failed", "error")]
    if bad:
        lines += ["## Failed cases", ""]
        lines += [f"- `{k[1]}::{k[2]}`: {_cell(junit.case_of(n).message)}" for k, n in bad[:50]]
        lines.append("")
    if m.conflicts:
        lines += ["## Conflicts", ""] + [f"- {_cell(c)}" for c in m.conflicts] + [""]
    for kind, matrix in sorted(m.matrices.items()):
        lines += ([f"<!-- {kind}/ -->"] if kind else []) + matrix.render_markdown().splitlines() + [""]
    for text in m.sections.values():
        lines += text.splitlines() + [""]
    return "\n".join(lines) + "\n"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def write(m: Merged, out: Path) -> list[Path]:
    """matrix.{md,html,json} per matrix kind, junit.xml and summary.md into ``out``."""
    written = []
    for kind, matrix in m.matrices.items():
        written += list(matrix.write(out / kind if kind else out))
    for key, text in m.sections.items():
        report.merge_section(out / "matrix.md", key, text)
    written.append(write_junit(m, out / JUNIT))
    (out / SUMMARY).write_text(summary(m))
    written.append(out / SUMMARY)
    return written


def check(m: Merged, out: Path) -> None:
    """Raise for what makes the merge untrustworthy, then for shards that failed."""
    if m.missing or m.unfinished:
        head = m.shards[0].manifest
        raise errors.ShardsMissing(missing=", ".join(m.missing) or "none", plan=head.get("plan", "?"),
                                   count=len(head.get("shards", ())),
                                   unfinished=(f" and {', '.join(m.unfinished)} did not finish"
                                               if m.unfinished else ""))
    if m.conflicts:
        raise errors.CellConflict(count=len(m.conflicts), cells="; ".join(m.conflicts[:8]))
    if m.failed:
        raise errors.ShardsFailed(count=len(m.failed), shards=", ".join(m.failed), report=out / SUMMARY)


def merge(dirs: list[Path], out: Path) -> Merged:
    """Collect, write everything, then :func:`check`: the report exists even when the merge fails."""
    m = collect(dirs)
    write(m, out)
    check(m, out)
    return m
