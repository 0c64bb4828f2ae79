"""Kernel config from fragments: merge with the kernel's own tools, then validate.

Like kunit.py's ``validate_config``: after ``merge_config.sh`` and
``olddefconfig`` every option a fragment asks for must still be in the final
``.config`` with the requested value, and the error names each one that was
dropped (usually an unmet dependency).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from vm import errors, runner

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")

#: value recorded for "# CONFIG_FOO is not set"
NOT_SET = "n"


@dataclass(frozen=True)
class Fragment:
    path: Path
    options: Mapping[str, str]

    @property
    def name(self) -> str:
        return self.path.stem


def parse_lines(lines: Iterable[str], source: str = "<config>") -> dict[str, str]:
    """Parse .config syntax into ``{"CONFIG_FOO": "y" | "m" | "n" | value}``."""
    options: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if m := _UNSET.match(line):
            options[m.group(1)] = NOT_SET
            continue
        if line.startswith("#"):
            continue
        m = _SET.match(line)
        if not m:
            raise errors.BadFragment(path=f"{source}:{number}", reason=f"cannot parse {line!r}",
                                     fix="use CONFIG_FOO=y|m|value or '# CONFIG_FOO is not set'")
        value = m.group(2)
        if value == "n":
            raise errors.BadFragment(path=f"{source}:{number}",
                                     reason=f"{m.group(1)}=n is not .config syntax and is ignored by kconfig",
                                     fix=f"write '# {m.group(1)} is not set'")
        options[m.group(1)] = value
    return options


def parse_fragment(path: Path) -> Fragment:
    if not path.is_file():
        raise errors.BadFragment(path=path, reason="no such file",
                                 fix="name a fragment in kconfig/ (e.g. base, debug)")
    return Fragment(path, parse_lines(path.read_text().splitlines(), str(path)))


def resolve_fragments(names: Iterable[str], kconfig_dir: Path) -> list[Fragment]:
    """``["base", "debug"]`` -> parsed ``kconfig/base.config``, ``kconfig/debug.config``."""
    frags = []
    for name in names:
        path = Path(name)
        if not path.suffix:
            path = kconfig_dir / f"{name}.config"
        frags.append(parse_fragment(path))
    if not frags:
        raise errors.BadArgument(what="no config fragment given", fix="pass at least kconfig/base.config")
    return frags


def requested(fragments: Iterable[Fragment]) -> dict[str, str]:
    """What the fragments ask for, later fragments overriding earlier ones."""
    wanted: dict[str, str] = {}
    for frag in fragments:
        wanted.update(frag.options)
    return wanted


def dropped_options(wanted: Mapping[str, str], final: Mapping[str, str]) -> list[str]:
    """Each requested option whose final value differs, as ``CONFIG_X=want (got: have)``."""
    missing = []
    for name, want in sorted(wanted.items()):
        have = final.get(name, NOT_SET)
        if have != want:
            missing.append(f"{name}={want} (got {'not set' if have == NOT_SET else have})")
    return missing


#: what a dropped option means right after olddefconfig, and after kbuild re-synced a kept
#: .config during make (a Kconfig file of the tree changed)
AFTER_OLDDEFCONFIG = ("after olddefconfig", "add the missing dependencies to the fragment or remove these lines")
AFTER_RESYNC = ("when kbuild re-synced the kept .config (a Kconfig file in the tree changed)",
                "undo the Kconfig edit that removed or renamed them, or change the fragment to match it")


def validate(wanted: Mapping[str, str], config_path: Path,
             context: tuple[str, str] = AFTER_OLDDEFCONFIG) -> None:
    final = parse_lines(config_path.read_text().splitlines(), str(config_path))
    missing = dropped_options(wanted, final)
    if missing:
        when, fix = context
        raise errors.ConfigOptionsDropped(count=len(missing), options=", ".join(missing), when=when, fix=fix)


def fingerprint(fragments: Iterable[Fragment]) -> str:
    """Names what the fragments ask for (:func:`requested`), not how it is written down.

    allnoconfig + the merged request + olddefconfig is the whole recipe, so a
    comment, a reordered line or an option moved from one fragment to another
    keeps the key (and the kernel already built for it), while any change to a
    requested value gives a new one."""
    text = "\n".join(f"{name}={value}" for name, value in sorted(requested(fragments).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_config(src: Path, obj: Path, fragments: list[Fragment], *, make_args: list[str],
                log: Path) -> Path:
    """allnoconfig + fragments (merge_config.sh) + olddefconfig, then validate.

    merge_config.sh writes temporary files into its working directory, so it
    runs in the build dir: the source tree is never written to.
    """
    obj.mkdir(parents=True, exist_ok=True)
    merge = src / "scripts" / "kconfig" / "merge_config.sh"
    if not merge.is_file():
        raise errors.SourceNotFound(what=f"script {merge}", fix="point --source at a Linux kernel tree")
    merged = obj / ".config"
    runner.run(["sh", merge, "-m", "-O", obj, *[f.path.resolve() for f in fragments]],
               cwd=obj, fix=f"check the fragments; log in {log}")
    seed = obj / "ovl-merged.config"
    merged.replace(seed)
    for target in ("allnoconfig", "olddefconfig"):
        extra = [f"KCONFIG_ALLCONFIG={seed}"] if target == "allnoconfig" else []
        rc = runner.run_logged(["make", "-C", src, f"O={obj}", *make_args, *extra, target], log)
        if rc != 0:
            raise errors.BuildFailed(build_dir=obj, reason=f"make {target} exited {rc}", log=log)
    validate(requested(fragments), merged)
    return merged
