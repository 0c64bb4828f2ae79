"""Series-level tools: checkpatch lint and the rendered cover letter."""

from __future__ import annotations

import email.utils
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jinja2

from vm import errors, runner
from vm.kernel.patch import Series

COVER_NAME = "0000-cover-letter.patch"
# Per-base prose of the cover letter, next to the series file (patches/<base>/).
COVER_DATA = "cover.toml"
# key -> required; every value is pre-wrapped text that the template inserts as is
COVER_KEYS = {"rebased": True, "port_note": False, "instance_id_site": True, "incompat_check_locking": True}
_TOTAL = re.compile(r"total: (\d+) errors, (\d+) warnings, (?:(\d+) checks, )?\d+ lines checked")


@dataclass(frozen=True)
class LintResult:
    patch: str
    errors: int
    warnings: int
    checks: int
    output: str

    @property
    def clean(self) -> bool:
        return self.errors == self.warnings == self.checks == 0


def parse_checkpatch(name: str, output: str) -> LintResult:
    m = _TOTAL.search(output)
    if not m:
        raise errors.CommandFailed(cmd=f"checkpatch.pl {name}", rc="without a summary",
                                   detail=f": {runner.tail(output, 2)}", fix="run it by hand")
    return LintResult(name, int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), output)


def checkpatch(tree: Path, series: Series) -> list[LintResult]:
    """``scripts/checkpatch.pl --strict`` on every patch of the series."""
    script = tree / "scripts" / "checkpatch.pl"
    if not script.is_file():
        raise errors.SourceNotFound(what=f"script {script}", fix="fetch a kernel tree first")
    results = []
    for patch in series.patches:
        res = runner.run(["perl", script, "--strict",
                          "--color=never", "--show-types", patch.path], cwd=tree, check=False)
        results.append(parse_checkpatch(patch.name, res.stdout + res.stderr))
    return results


# --- cover letter --------------------------------------------------------------

@dataclass(frozen=True)
class PatchInfo:
    subject: str
    filename: str


@dataclass(frozen=True)
class Recipients:
    """Who ``scripts/get_maintainer.pl`` of the base tree says a patch goes to."""

    patch: str                    # file name of the patch
    addresses: tuple[str, ...]    # "Name <mail>" or a list address, in its order


def maintainers(tree: Path, series: Series) -> list[Recipients]:
    """``get_maintainer.pl --nogit`` on every patch (MAINTAINERS only: the tree
    is a release tarball, and git history would make the list depend on it)."""
    script = tree / "scripts" / "get_maintainer.pl"
    if not script.is_file():
        raise errors.SourceNotFound(what=f"script {script}", fix="fetch a kernel tree first")
    out = []
    for patch in series.patches:
        res = runner.run(["perl", script, "--nogit", "--nogit-fallback", "--norolestats",
                          patch.path.resolve()], cwd=tree, quiet=True)
        addresses = tuple(line.strip() for line in res.stdout.splitlines() if "@" in line)
        out.append(Recipients(patch.name, addresses))
    return out


#: identities that can never be sent: an RFC 2606 ``.invalid`` address (the harness
#: used ``dev@ovl-volatile-harness.invalid`` as a placeholder), no address at all
_PLACEHOLDER = re.compile(r"\.invalid>?$|<>|^[^<]*$", re.I)


def identity_problems(series: Series) -> list[str]:
    """Why the series could not be sent as is: each patch's ``From:`` must be a real
    identity that also signs the patch off (the sender's, see ``git config user.name``)."""
    problems = []
    for patch in series.patches:
        author = _header(patch.path, "From") or ""
        text = patch.path.read_text(errors="replace").split("\n---\n", 1)[0]
        signoffs = [line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("Signed-off-by:")]
        if not author or _PLACEHOLDER.search(author):
            problems.append(f"{patch.name}: From: {author or '(none)'} is not a real identity")
        if author not in signoffs:
            problems.append(f"{patch.name}: not signed off by its author {author or '(none)'}")
    return problems


def diffstat(pristine: Path, patched: Path, series: Series) -> str:
    """``git diff --stat`` of the files the series touches, in a scratch repo."""
    touched: list[str] = []
    for patch in series.patches:
        res = runner.run(["git", "apply", "--numstat", patch.path], cwd=patched, quiet=True)
        for line in res.stdout.splitlines():
            path = line.split("\t")[-1]
            if path not in touched:
                touched.append(path)
    tmp = Path(tempfile.mkdtemp(prefix="ovl-diffstat-"))
    try:
        git = ["git", "-C", str(tmp), "-c", "user.name=x", "-c", "user.email=x@x", "-c", "commit.gpgsign=false"]
        runner.run([*git, "init", "-q"], quiet=True)
        for side in (pristine, patched):
            for rel in touched:
                dest = tmp / rel
                if (side / rel).is_file():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(side / rel, dest)
                else:
                    dest.unlink(missing_ok=True)
            if side == pristine:
                runner.run([*git, "add", "-A"], quiet=True)
                runner.run([*git, "commit", "-q", "--allow-empty", "-m", "base"], quiet=True)
        runner.run([*git, "add", "-A"], quiet=True)
        return runner.run([*git, "diff", "--cached", "--stat=72"], quiet=True).stdout.rstrip("\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _header(path: Path, name: str) -> str | None:
    """A mail header of a ``git format-patch`` file, unfolded (git folds a long
    ``From:`` onto a continuation line starting with whitespace)."""
    value = None
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            break
        if value is not None and line[:1] in (" ", "\t"):
            value += " " + line.strip()
            continue
        if value is not None:
            return value
        if line.startswith(f"{name}:"):
            value = line.split(":", 1)[1].strip()
    return value


def load_cover_data(path: Path) -> dict[str, str]:
    """The per-base cover letter text (see :data:`COVER_KEYS`) from ``cover.toml``.

    There is deliberately no default: the text says what the port onto this
    base changed, and a copy of another base's text would be wrong.
    """
    keys = ", ".join(f"{k} ({'required' if req else 'optional'})" for k, req in COVER_KEYS.items())
    if not path.is_file():
        raise errors.SeriesError(series=path, reason="no per-base cover letter data",
                                 fix=f"create it (TOML, keys: {keys}), like patches/*/{COVER_DATA}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise errors.SeriesError(series=path, reason=f"not valid TOML ({exc})", fix="correct the syntax")
    unknown = sorted(set(data) - set(COVER_KEYS))
    missing = sorted(k for k, req in COVER_KEYS.items() if req and not str(data.get(k, "")).strip())
    wrong = sorted(k for k, v in data.items() if k in COVER_KEYS and not isinstance(v, str))
    if unknown or missing or wrong:
        reason = "; ".join(part for part in (
            unknown and f"unknown keys {', '.join(unknown)}",
            missing and f"missing or empty keys {', '.join(missing)}",
            wrong and f"keys that are not strings {', '.join(wrong)}") if part)
        raise errors.SeriesError(series=path, reason=reason, fix=f"use the keys {keys}")
    return {k: data.get(k, "").strip("\n") for k in COVER_KEYS}


def render_cover_letter(series: Series, template: Path, *, diffstat_text: str,
                        base_version: str, base_commit: str | None,
                        recipients: list[Recipients] | tuple = ()) -> str:
    """Render the template for a series in ``patches/<base>/series``.

    The base (e.g. "6.1") is the name of the series' directory, and the
    per-base text comes from the ``cover.toml`` next to the series file.
    """
    if not len(series):
        raise errors.SeriesError(series=series.path, reason="the series is empty",
                                 fix="add patches before rendering a cover letter")
    base = series.path.parent.name
    cover = load_cover_data(series.path.parent / COVER_DATA)
    first = series.patches[0].path
    author = _header(first, "From") or "unknown"
    dates = [email.utils.parsedate_to_datetime(d) for p in series.patches
             if (d := _header(p.path, "Date"))]
    date = email.utils.format_datetime(max(dates)) if dates else ""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template.parent)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(template.name).render(
        patches=[PatchInfo(p.subject(), p.name) for p in series.patches], diffstat=diffstat_text,
        base=base, base_version=base_version, base_commit=base_commit, cover=cover,
        author=author, date=date, recipients=_recipient_groups(series, recipients))


def _recipient_groups(series: Series, recipients) -> list[dict]:
    """Consecutive patches with the same recipients, as ``{"patches": "2-4", "to": [...]}``."""
    by_name = {r.patch: r.addresses for r in recipients}
    groups: list[dict] = []
    for number, p in enumerate(series.patches, 1):
        to = list(by_name.get(p.name, ()))
        if not to:
            continue
        if groups and groups[-1]["to"] == to and groups[-1]["last"] == number - 1:
            groups[-1]["last"] = number
        else:
            groups.append({"first": number, "last": number, "to": to})
    for g in groups:
        g["patches"] = str(g["first"]) if g["first"] == g["last"] else f"{g['first']}-{g['last']}"
    return groups


def stale_reason(cover_text: str, tree_version: str) -> str:
    """Why a committed cover letter differs from a fresh rendering, when it can be told:
    a distribution's source package moves to a new point release under an unchanged
    series (Debian's linux-source-6.12 went from 6.12.117 to 6.12.118)."""
    found = re.search(r"^Base: Linux (\S+)", cover_text, re.M)
    if found and found.group(1) != tree_version:
        return (f"it names Linux {found.group(1)}, the tree is Linux {tree_version}: the source moved on; "
                f"check the series still applies and passes there")
    return ""
