"""One package of a Debian archive suite, verified by the archive's own chain of trust.

The pure half of fetch.py's ``debian-archive:SUITE/PACKAGE[=VERSION]`` source
(no network, no cache here): the suite's ``InRelease`` is checked with
``gpgv`` against a keyring (``debian-archive-keyring``) and only the text gpgv
verified is parsed; it lists the sha256 and size of each ``Packages`` index;
the ``Packages`` stanza lists the sha256 and size of the ``.deb``; the
``.deb`` (an ``ar`` archive) holds ``data.tar.*``, which holds
``usr/src/<package>.tar.*``.  Every broken link raises a one-line error from
:mod:`vm.errors`.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import io
import lzma
import os
import platform
import re
import tarfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from vm import errors
from vm.runner import echo, run, tail

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
COMPONENT = "main"
CHUNK = 1 << 20

_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "ppc64le": "ppc64el",
           "s390x": "s390x", "riscv64": "riscv64"}
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FILENAME_RE = re.compile(r"^[\w.+~%/-]+$")
_SIGNED_HEADER = b"-----BEGIN PGP SIGNED MESSAGE-----"


@dataclass(frozen=True)
class Release:
    """The verified top of a suite: its fields and the sha256/size of every index it lists."""

    suite: str
    url: str
    fields: dict[str, str]
    sha256: dict[str, tuple[str, int]]  # "main/binary-all/Packages.xz" -> (sha256, size)
    signers: tuple[str, ...]

    @property
    def by_hash(self) -> bool:
        return self.fields.get("Acquire-By-Hash", "").lower() == "yes"


@dataclass(frozen=True)
class Entry:
    """One ``Packages`` stanza of the wanted package."""

    package: str
    version: str
    filename: str  # relative to the mirror, e.g. pool/main/l/linux/linux-source-7.2_7.2.13-1_all.deb
    size: int
    sha256: str


def index_paths() -> list[str]:
    """The Packages indices to search, in order: Architecture all, then the host's."""
    native = _ARCHES.get(platform.machine(), "amd64")
    return [f"{COMPONENT}/binary-{arch}/Packages.xz" for arch in dict.fromkeys(("all", native))]


# --- InRelease ---------------------------------------------------------------

def verify_inrelease(inrelease: Path, keyring: Path, work: Path, *, suite: str,
                     url: str) -> tuple[str, tuple[str, ...]]:
    """(the text of ``inrelease`` that gpgv verified against ``keyring``, the fingerprints
    of the good signatures); ``work`` is a private scratch dir.  Nothing from the
    unverified file is ever returned."""
    def invalid(reason: str) -> errors.ArchiveSignatureInvalid:
        return errors.ArchiveSignatureInvalid(
            suite=suite, url=url, keyring=keyring, reason=reason,
            fix="check the mirror (a tampered or foreign InRelease) or update debian-archive-keyring; "
                "nothing was kept")

    raw = inrelease.read_bytes()
    if not raw.startswith(_SIGNED_HEADER) or raw.count(_SIGNED_HEADER) != 1:
        raise invalid("not exactly one clear-signed message")
    home = work / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    verified = work / "InRelease.verified"
    verified.unlink(missing_ok=True)
    res = run(["gpgv", "--homedir", home, "--keyring", keyring, "--status-fd", "1",
               "--output", verified, inrelease], check=False)
    status = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    signers = _good_signers(status)
    bad = _bad(status)
    if bad or not signers or not verified.is_file():
        raise invalid(bad or _why_not_good(status) or tail(res.stderr, 1) or "no good signature")
    return verified.read_text(encoding="utf-8", errors="replace"), signers


def _good_signers(status: list[list[str]]) -> tuple[str, ...]:
    """Fingerprints of the signatures gpgv found good (GOODSIG and VALIDSIG, as apt counts
    them); a signature by an unknown, expired or revoked key adds nothing but spoils nothing."""
    good: list[str] = []
    blocks: list[list[list[str]]] = [[]]
    for words in status:
        if words[:1] == ["NEWSIG"]:
            blocks.append([])
        blocks[-1].append(words)
    for block in blocks:
        kinds = {w[0] for w in block if w}
        valid = [w[1] for w in block if w[:1] == ["VALIDSIG"] and len(w) > 1]
        if "GOODSIG" in kinds and valid:
            good.append(valid[0])
    return tuple(good)


def _bad(status: list[list[str]]) -> str:
    """A signature that does not match the content: the file was altered."""
    for words in status:
        if words[:1] == ["BADSIG"]:
            return f"bad signature by key {words[1] if len(words) > 1 else '?'}: the content was altered"
    return ""


def _why_not_good(status: list[list[str]]) -> str:
    unknown = [w[1] for w in status if w[:1] == ["NO_PUBKEY"] and len(w) > 1]
    if unknown:
        return f"signed only by unknown key {', '.join(dict.fromkeys(unknown))}"
    for words in status:
        if words[:1] in (["EXPKEYSIG"], ["REVKEYSIG"], ["EXPSIG"]):
            return f"{words[0]} by key {words[1] if len(words) > 1 else '?'}"
    if any(words[:1] == ["NODATA"] for words in status):
        return "no signature found"
    return ""


def parse_release(text: str, suite: str, url: str, signers: tuple[str, ...] = ()) -> Release:
    """Parse verified InRelease ``text``; it must describe ``suite`` (its Suite or Codename)."""
    fields = deb822_fields(text.split("\n\n", 1)[0])
    names = {fields.get("Suite", ""), fields.get("Codename", "")} - {""}
    if suite not in names:
        raise errors.ArchiveInconsistent(
            mirror=url.rsplit("/dists/", 1)[0], suite=suite,
            what=f"its signed InRelease describes {' / '.join(sorted(names)) or 'no suite'}",
            fix="the mirror serves another suite under this name; use another mirror")
    sums: dict[str, tuple[str, int]] = {}
    for line in fields.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and _SHA256_RE.match(parts[0]) and parts[1].isdigit():
            sums[parts[2]] = (parts[0], int(parts[1]))
    _warn_if_expired(fields, suite)
    return Release(suite, url, fields, sums, signers)


def _warn_if_expired(fields: dict[str, str], suite: str) -> None:
    """apt refuses an expired InRelease; a package pinned by sha256 is still what the key
    signed, so an old (frozen) mirror only gets a warning."""
    try:
        until = email.utils.parsedate_to_datetime(fields["Valid-Until"])
    except (KeyError, TypeError, ValueError):
        return
    if until.tzinfo is None:
        until = until.replace(tzinfo=timezone.utc)
    if until < datetime.now(timezone.utc):
        echo(f"warning: the InRelease of {suite} expired on {fields['Valid-Until']} "
             "(an old or frozen mirror); its signature and checksums are still checked")


def deb822_fields(stanza: str) -> dict[str, str]:
    """Fields of one deb822 stanza; continuation lines are joined with newlines."""
    fields: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t"):
            if key is not None:
                fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields


# --- Packages ----------------------------------------------------------------

def decompress_index(data: bytes) -> str:
    """The text of a ``Packages.xz`` whose sha256 already verified."""
    try:
        return lzma.decompress(data).decode("utf-8", errors="replace")
    except lzma.LZMAError as exc:
        raise ValueError(f"not an xz file ({exc})") from exc


def package_entries(text: str, package: str) -> list[Entry]:
    """Every stanza of ``package`` in a Packages index."""
    found = []
    needle = f"Package: {package}\n"
    for stanza in text.split("\n\n"):
        if not (stanza.startswith(needle) or f"\n{needle}" in stanza):
            continue
        fields = deb822_fields(stanza)
        if fields.get("Package") != package:
            continue
        try:
            found.append(Entry(package, fields["Version"], _safe_filename(fields["Filename"]),
                               int(fields["Size"]), fields["SHA256"].lower()))
        except (KeyError, ValueError):
            continue  # an incomplete stanza cannot be verified: never used
    return [e for e in found if _SHA256_RE.match(e.sha256)]


def _safe_filename(name: str) -> str:
    parts = name.split("/")
    if not _FILENAME_RE.match(name) or name.startswith("/") or ".." in parts:
        raise ValueError(f"unsafe Filename {name!r}")
    return name


def similar_packages(text: str, package: str, limit: int = 8) -> list[str]:
    """Package names in the index sharing ``package``'s stem (linux-source-7.3 -> linux-source-*)."""
    stem = package.rsplit("-", 1)[0] if "-" in package else package
    names = re.findall(rf"^Package: ({re.escape(stem)}\S*)$", text, re.MULTILINE)
    return sorted(dict.fromkeys(names), key=version_key)[-limit:]


def choose(entries: list[Entry], pin: str | None) -> Entry | None:
    """The pinned version, or the highest one; None if the pin is not there."""
    if pin is not None:
        return next((e for e in entries if e.version == pin), None)
    return max(entries, key=lambda e: version_key(e.version))


# --- Debian version ordering (dpkg's verrevcmp) ------------------------------

def _order(c: str) -> int:
    if not c or c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return -1 if c == "~" else ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac, bc = _order(a[i:i + 1]), _order(b[j:j + 1])
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        m = re.match(r"\d*", a[i:])
        n = re.match(r"\d*", b[j:])
        da, db = m.group(0) if m else "", n.group(0) if n else ""
        i, j = i + len(da), j + len(db)
        if int(da or 0) != int(db or 0):
            return int(da or 0) - int(db or 0)
    return 0


def compare_versions(a: str, b: str) -> int:
    """<0, 0, >0 as Debian version ``a`` sorts before, equal to or after ``b``."""
    (ea, ua, ra), (eb, ub, rb) = _split_version(a), _split_version(b)
    if ea != eb:
        return ea - eb
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, sep, rest = v.partition(":")
    if not sep or not epoch.isdigit():
        epoch, rest = "0", v
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, ""
    return int(epoch), upstream, revision


version_key = functools.cmp_to_key(compare_versions)


# --- the .deb ----------------------------------------------------------------

class _Slice(io.RawIOBase):
    """``size`` bytes of ``fh`` from its current position, as a read-only stream."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.left = fh, size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        want = min(len(buf), self.left)
        data = self.fh.read(want) if want else b""
        buf[:len(data)] = data
        self.left -= len(data)
        return len(data)


def _ar_members(fh: BinaryIO) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every member of an ar archive."""
    if fh.read(8) != b"!<arch>\n":
        raise ValueError("not an ar archive (no !<arch> magic)")
    members = []
    while header := fh.read(60):
        if len(header) < 60 or header[58:60] != b"`\n":
            raise ValueError("truncated or corrupt ar member header")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii", "replace").strip() or "-1")
        if size < 0:
            raise ValueError(f"bad size in ar member {name!r}")
        members.append((name, fh.tell(), size))
        fh.seek(size + (size & 1), os.SEEK_CUR)
    return members


def extract_source_tarball(deb: Path, package: str, out: Path) -> tuple[str, str]:
    """Copy ``usr/src/<package>.tar.*`` out of ``deb``'s data.tar into ``out``;
    return (its file name, its sha256).  ``ValueError`` says what is wrong."""
    with open(deb, "rb") as fh:
        members = _ar_members(fh)
        data = [m for m in members if m[0].startswith("data.tar")]
        if not data:
            raise ValueError(f"no data.tar member (members: {', '.join(m[0] for m in members)})")
        name, offset, size = data[0]
        if name.endswith(".zst"):
            raise ValueError(f"{name} is zstd-compressed, which Python's tarfile cannot read")
        fh.seek(offset)
        stream = io.BufferedReader(_Slice(fh, size), CHUNK)
        try:
            return _copy_member(stream, package, out)
        except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise ValueError(f"{name}: {type(exc).__name__}: {exc}") from exc


def _copy_member(stream: BinaryIO, package: str, out: Path) -> tuple[str, str]:
    wanted = re.compile(rf"^usr/src/{re.escape(package)}\.tar(\.(xz|gz|bz2))?$")
    seen = []
    with tarfile.open(fileobj=stream, mode="r|*") as tf:
        for member in tf:
            path = member.name.removeprefix("./")
            if path.startswith("usr/src/") and len(seen) < 5:
                seen.append(path)
            if not wanted.match(path):
                continue
            if not member.isreg():
                raise ValueError(f"{path} is not a regular file")
            src = tf.extractfile(member)
            assert src is not None
            h = hashlib.sha256()
            with open(out, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
            return path.rsplit("/", 1)[-1], h.hexdigest()
    raise ValueError(f"no usr/src/{package}.tar.* in it (usr/src has: {', '.join(seen) or 'nothing'})")
