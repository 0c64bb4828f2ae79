"""Get a pristine kernel source tree for a base, cached and reused.

Sources (see :meth:`SourceSpec.parse`): Debian's installed ``linux-source-X.Y``
package, one package's ``.deb`` from a Debian archive suite (verified by the
archive's signed chain, see :mod:`vm.kernel.debarchive`), a kernel.org release,
a local or remote tarball, a git ref, or a tree used in place.  Downloads land
in ``<cache>/downloads/`` only after their sha256 verifies; extracted trees
appear in ``<cache>/trees/<key>/`` only by an atomic rename of a temp dir, so
an interrupted fetch never leaves a tree a later run trusts.  A lock file
serialises fetches sharing a cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import requests

from vm import errors
from vm.kernel import debarchive
from vm.runner import echo, run, tail

KERNELORG_MIRROR = "https://cdn.kernel.org/pub/linux/kernel"
TARBALL_EXTS = (".tar.xz", ".tar.gz", ".tar.bz2", ".tgz")
DEBIAN_EXTS = (".tar.xz", ".tar.bz2", ".tar.gz")
SPEC_FORMS = ("debian[:X.Y], debian-archive:SUITE/PACKAGE[=VERSION], kernel.org:X.Y.Z, "
              "tarball:PATH_OR_URL[#sha256=HEX], "
              "git:URL[@REF], tree:DIR, or a bare tarball path/URL, .git URL or directory")
TIMEOUT = (15, 60)  # requests (connect, read) seconds
CHUNK = 1 << 20
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0"}

_BASE_RE = re.compile(r"^\d+\.\d+$")
_RELEASE_RE = re.compile(r"^\d+\.\d+(\.\d+)?$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-fA-F]{7,40}$")
_FULL_COMMIT_RE = re.compile(r"^[0-9a-fA-F]{40}$")
_SUMS_LINE_RE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(\S+)\s*$")
_ARCHIVE_SPEC_RE = re.compile(
    r"^([a-z0-9][a-z0-9.+-]*)/([a-z0-9][a-z0-9.+-]+)(?:=([0-9][A-Za-z0-9.+~:-]*))?$")
_RECORD_KEYS = ("version", "filename", "tarball", "sha256")
_MAKEFILE_VAR_RE = re.compile(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=[ \t]*(.*?)\s*$",
                              re.MULTILINE)


@dataclass(frozen=True)
class TreeKind:
    """What a fetched tree must be: a kernel tree by default, or another source tree
    (fstests, unionmount-testsuite) fetched, verified and cached by the same code."""

    name: str                                  # "kernel tree", "fstests tree", ...
    version: Callable[[Path], str | None]      # the tree's version, None if it is not one
    fix: str                                   # what to use instead of a wrong tarball


@dataclass(frozen=True)
class Tree:
    path: Path       # the source root (contains the top-level Makefile)
    key: str         # 16 hex, stable id of the content
    version: str     # e.g. "6.12.117"
    origin: str      # e.g. "debian:/usr/src/linux-source-6.12.tar.xz"
    in_place: bool   # a user tree used in place, never modified by us


# --- spec parsing ------------------------------------------------------------

@dataclass(frozen=True)
class SourceSpec:
    kind: str        # "debian" | "debian-archive" | "kernelorg" | "tarball" | "git" | "tree"
    value: str       # debian-archive: "SUITE/PACKAGE"
    ref: str | None = None  # git: the ref; debian-archive: the pinned package version
    sha256: str | None = None

    @classmethod
    def parse(cls, text: str, base: str) -> "SourceSpec":
        """Parse a ``--source`` string; ``base`` (e.g. "6.12") fills in ``debian``."""
        text = text.strip() or "debian"
        prefix, sep, rest = text.partition(":")
        if prefix == "debian":
            return cls("debian", _check_base(rest if sep else base, text))
        if prefix == "debian-archive":
            return _archive_spec(rest, text)
        if prefix in ("kernel.org", "kernelorg"):
            return cls("kernelorg", _check_release(rest, text))
        if prefix == "tarball" and sep:
            return _tarball_spec(rest, text)
        if prefix == "git" and sep:
            return _git_spec(rest, text)
        if prefix == "tree" and sep:
            return cls("tree", _abspath(_nonempty(rest, text)))
        return _bare_spec(text)


def _bad_spec(text: str, why: str = "unrecognised kernel source") -> errors.BadArgument:
    return errors.BadArgument(what=f"{why} {text!r}", fix=f"use one of: {SPEC_FORMS}")


def _nonempty(value: str, text: str) -> str:
    if not value:
        raise _bad_spec(text, "empty value in kernel source")
    return value


def _check_base(value: str, text: str) -> str:
    if not _BASE_RE.match(value):
        raise errors.BadArgument(what=f"kernel source {text!r} needs a base like 6.12, got {value!r}",
                                 fix="write debian or debian:X.Y (e.g. debian:6.12)")
    return value


def _check_release(value: str, text: str) -> str:
    if not _RELEASE_RE.match(value):
        raise errors.BadArgument(what=f"kernel source {text!r} needs a full release version",
                                 fix="write kernel.org:X.Y.Z (e.g. kernel.org:6.12.117)")
    return value


def _archive_spec(value: str, text: str) -> SourceSpec:
    m = _ARCHIVE_SPEC_RE.match(value)
    if not m:
        raise errors.BadArgument(what=f"kernel source {text!r} needs a suite and a package",
                                 fix="write debian-archive:SUITE/PACKAGE[=VERSION] "
                                     "(e.g. debian-archive:sid/linux-source-7.2)")
    return SourceSpec("debian-archive", f"{m.group(1)}/{m.group(2)}", m.group(3))


def _abspath(value: str) -> str:
    return os.path.abspath(os.path.expanduser(value))


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _tarball_spec(value: str, text: str) -> SourceSpec:
    location, _, fragment = value.partition("#")
    sha = None
    if fragment:
        key, _, sha = fragment.partition("=")
        if key != "sha256" or not _SHA256_RE.match(sha):
            raise errors.BadArgument(what=f"bad checksum suffix {fragment!r} in {text!r}",
                                     fix="append #sha256=<64 hex digits> or nothing")
        sha = sha.lower()
    location = _nonempty(location, text)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if not _is_url(location):
        location = _abspath(location)
    return SourceSpec("tarball", location, None, sha)


def _split_git_ref(value: str) -> tuple[str, str | None]:
    """Split ``URL@REF``; an ``@`` that is userinfo (``git@host:``, ``https://u@h/``) stays."""
    url, sep, ref = value.rpartition("@")
    if not sep or not url or not ref or ":" in ref:  # refs cannot contain ':'
        return value, None
    scheme, has_scheme, after = url.partition("://")
    if has_scheme and "/" not in after:  # https://user@host/repo.git
        return value, None
    return url, ref


def _git_spec(value: str, text: str) -> SourceSpec:
    url, ref = _split_git_ref(value)
    _check_git_args(_nonempty(url, text), ref)
    return SourceSpec("git", url, ref)


def _check_git_args(url: str, ref: str | None) -> None:
    """Refuse a URL or ref git would parse as an option."""
    for arg in (url, ref or ""):
        if arg.startswith("-"):
            raise errors.BadArgument(what=f"git URL/ref {arg!r} starts with '-'",
                                     fix="write git:URL@REF with a real URL and branch, tag or commit")


def _bare_spec(text: str) -> SourceSpec:
    location = text.partition("#")[0]
    if location.endswith(TARBALL_EXTS):
        return _tarball_spec(text, text)
    url, ref = _split_git_ref(text)
    if url.endswith(".git") and ("://" in url or re.match(r"^[\w.-]+@[\w.-]+:", url)):
        return _git_spec(text, text)
    if os.path.isdir(os.path.expanduser(text)):
        return SourceSpec("tree", _abspath(text))
    raise _bad_spec(text)


# --- entry point -------------------------------------------------------------

def fetch(spec: SourceSpec, cache_dir: Path, *, kernelorg_mirror: str = KERNELORG_MIRROR,
          debian_src_dir: Path = Path("/usr/src"), debian_mirror: str = debarchive.DEFAULT_MIRROR,
          debian_keyring: Path = debarchive.DEFAULT_KEYRING, progress: bool = True,
          kind: "TreeKind | None" = None) -> Tree:
    """Return a pristine tree for ``spec`` (a kernel tree unless ``kind`` says otherwise),
    reusing ``cache_dir`` when possible."""
    kind = kind or KERNEL
    if spec.kind == "tree":
        return _fetch_tree(spec, kind)
    if kind is not KERNEL and spec.kind not in ("tarball", "git"):
        raise errors.BadArgument(what=f"a {kind.name} cannot come from a {spec.kind}: source",
                                 fix="use tarball:PATH_OR_URL[#sha256=HEX], git:URL@REF or tree:DIR")
    cache = Cache(Path(cache_dir), kind)
    with cache.locked():
        cache.clean_stale()
        if spec.kind == "debian":
            return _fetch_debian(cache, spec, Path(debian_src_dir), progress)
        if spec.kind == "debian-archive":
            archive = _Archive(cache, debian_mirror.rstrip("/"), Path(debian_keyring), progress)
            return archive.fetch(spec)
        if spec.kind == "kernelorg":
            return _fetch_kernelorg(cache, spec, kernelorg_mirror.rstrip("/"), progress)
        if spec.kind == "tarball":
            return _fetch_tarball(cache, spec, progress)
        if spec.kind == "git":
            return _fetch_git(cache, spec, progress)
    raise errors.BadArgument(what=f"unknown kernel source kind {spec.kind!r}",
                             fix=f"use one of: {SPEC_FORMS}")


# --- cache -------------------------------------------------------------------

@dataclass(frozen=True)
class Cache:
    root: Path
    kind: "TreeKind | None" = None     # None: a kernel tree

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def trees(self) -> Path:
        return self.root / "trees"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the cache (waits for another fetch)."""
        try:
            self.downloads.mkdir(parents=True, exist_ok=True)
            self.trees.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".lock", "w")
        except OSError as exc:
            raise errors.CacheUnusable(path=self.root, reason=exc.strerror or str(exc),
                                fix="pass a writable cache dir") from exc
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                echo(f"waiting for another fetch holding {self.root / '.lock'} ...")
                fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def clean_stale(self) -> None:
        """Remove temp dirs and part files left by an interrupted fetch (we hold the lock)."""
        for tmp in self.trees.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for part in self.downloads.glob(".part-*"):
            part.unlink(missing_ok=True)

    def lookup(self, key: str) -> Path | None:
        """The kernel root of cached tree ``key``, or None (a broken entry is removed)."""
        entry = self.trees / key
        if not entry.exists():
            return None
        root = _single_tree_dir(entry, self.kind or KERNEL)
        if root is None:
            echo(f"discarding unusable cache entry {entry}")
            self.discard(entry)
        return root

    def discard(self, entry: Path) -> None:
        graveyard = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.trees))
        os.rename(entry, graveyard / "old")
        shutil.rmtree(graveyard, ignore_errors=True)

    def build(self, make: Callable[[Path], tuple[Path, str]]) -> tuple[Path, str]:
        """``make(tmpdir)`` fills a temp dir and returns (kernel root in it, key); publish it
        as ``trees/<key>`` by one atomic rename.  Returns (published root, key)."""
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.trees))
        try:
            root, key = make(tmp)
            existing = self.lookup(key)
            if existing is not None:
                return existing, key
            os.rename(tmp, self.trees / key)
            return self.trees / key / root.relative_to(tmp), key
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def download_path(self, name: str, sha: str) -> Path:
        return self.downloads / f"{sha[:16]}-{name}"

    def _url_record(self, url: str) -> Path:
        return self.downloads / f"url-{_sha_text(url)[:16]}.sha256"

    def recorded_sha(self, url: str) -> str | None:
        """The sha256 a previous run verified for ``url``, if any."""
        try:
            sha = self._url_record(url).read_text().strip()
        except FileNotFoundError:
            return None
        return sha if _SHA256_RE.match(sha) else None

    def record_sha(self, url: str, sha: str) -> None:
        _write_atomic(self._url_record(url), sha + "\n")

    def forget(self, url: str, tarball: Path) -> None:
        """Drop a download (and its URL record) that turned out unusable."""
        self._url_record(url).unlink(missing_ok=True)
        if tarball.parent == self.downloads:
            tarball.unlink(missing_ok=True)


def _single_tree_dir(entry: Path, kind: "TreeKind") -> Path | None:
    if not entry.is_dir() or entry.is_symlink():
        return None
    dirs = [d for d in entry.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(dirs) == 1 and kind.version(dirs[0]) is not None:
        return dirs[0]
    return None


def _sha_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- version -----------------------------------------------------------------

def read_version(root: Path) -> str | None:
    """``make kernelversion`` from the top-level Makefile, or None if not a kernel tree."""
    try:
        with open(root / "Makefile", encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    found: dict[str, str] = {}
    for var, value in _MAKEFILE_VAR_RE.findall(head):
        found.setdefault(var, value)
    if not found.get("VERSION") or not found.get("PATCHLEVEL"):
        return None
    sub = f".{found['SUBLEVEL']}" if found.get("SUBLEVEL") else ""
    return f"{found['VERSION']}.{found['PATCHLEVEL']}{sub}{found.get('EXTRAVERSION', '')}"


KERNEL = TreeKind("kernel tree", read_version, "use a Linux kernel source tarball")


# --- tree in place -----------------------------------------------------------

def _fetch_tree(spec: SourceSpec, kind: "TreeKind") -> Tree:
    root = Path(spec.value)
    if not root.is_dir():
        raise errors.SourceNotFound(what=f"directory {root}", fix="check the path given to tree:")
    version = kind.version(root)
    if version is None and kind is KERNEL:
        raise errors.SourceNotFound(what=f"tree {root} (no top-level Makefile with VERSION/PATCHLEVEL)",
                                    fix="point tree: at the root of a kernel source tree")
    if version is None:
        raise errors.SourceNotFound(what=f"{kind.name} {root} (not recognised as one)",
                                    fix=f"point tree: at the root of a {kind.name}")
    return Tree(root, tree_fingerprint(root), version, f"tree:{root}", True)


def tree_fingerprint(root: Path) -> str:
    """16 hex over (relpath, size, mtime_ns, mode) of every entry but .git, plus git HEAD."""
    h = hashlib.sha256()
    for line in sorted(_stat_lines(os.fspath(root))):
        h.update(line.encode("utf-8", "surrogateescape"))
    if (root / ".git").exists():
        res = run(["git", "-C", root, "rev-parse", "HEAD"], check=False)
        if res.ok:
            h.update(f"HEAD\0{res.stdout.strip()}".encode())
    return h.hexdigest()[:16]


def _stat_lines(root: str) -> Iterator[str]:
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel) if rel else root)
        except FileNotFoundError:
            continue
        with it:
            for entry in it:
                if entry.name == ".git":
                    continue
                path = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n"


# --- debian / local tarballs -------------------------------------------------

def _fetch_debian(cache: Cache, spec: SourceSpec, src_dir: Path, progress: bool) -> Tree:
    package = f"linux-source-{spec.value}"
    for ext in DEBIAN_EXTS:
        tarball = src_dir / f"{package}{ext}"
        if tarball.is_file():
            return _from_local_tarball(cache, tarball, None, f"debian:{tarball}", progress)
    raise errors.SourceNotFound(what=f"{src_dir / package}.tar.xz (Debian package {package})",
                                fix=f"apt-get install {package}")


def _from_local_tarball(cache: Cache, tarball: Path, expected: str | None,
                        origin: str, progress: bool) -> Tree:
    if not tarball.is_file():
        raise errors.SourceNotFound(what=f"tarball {tarball}", fix="check the path given to tarball:")
    sha = _sha_file(tarball)
    if expected and sha != expected:
        raise errors.ChecksumMismatch(name=tarball, actual=sha, expected=expected)
    return _tree_from_tarball(cache, tarball, sha, origin, progress)


def _tree_from_tarball(cache: Cache, tarball: Path, sha: str, origin: str, progress: bool) -> Tree:
    key = sha[:16]
    root = cache.lookup(key)
    if root is None:
        root, _ = cache.build(lambda tmp: (extract(tarball, tmp, progress=progress, kind=cache.kind), key))
    else:
        echo(f"reusing cached tree {root}")
    return _cached_tree(root, key, origin, cache.kind)


def _cached_tree(root: Path, key: str, origin: str, kind: "TreeKind | None" = None) -> Tree:
    version = (kind or KERNEL).version(root)
    assert version is not None  # checked before publishing
    return Tree(root, key, version, origin, False)


# --- kernel.org and URLs -----------------------------------------------------

def _fetch_kernelorg(cache: Cache, spec: SourceSpec, mirror: str, progress: bool) -> Tree:
    name = f"linux-{spec.value}.tar.xz"
    folder = f"{mirror}/v{spec.value.split('.')[0]}.x"
    url = f"{folder}/{name}"
    # Releases are immutable: the sha verified by an earlier run is reused offline.
    sha = cache.recorded_sha(url) or published_sha256(f"{folder}/sha256sums.asc", name)
    return _fetch_url(cache, url, sha, f"kernel.org:{url}", progress)


def published_sha256(sums_url: str, name: str) -> str:
    """The sha256 of ``name`` listed in a kernel.org ``sha256sums.asc``.

    The file is PGP clear-signed; only its hash lines are parsed, the
    signature is NOT verified (HTTPS to the mirror is the trust anchor).
    """
    try:
        resp = requests.get(sums_url, timeout=TIMEOUT)
    except requests.RequestException as exc:
        raise _fetch_failed(sums_url, exc) from exc
    _check_status(resp, sums_url)
    for line in resp.text.splitlines():
        m = _SUMS_LINE_RE.match(line.strip())
        if m and m.group(2) == name:
            return m.group(1).lower()
    raise errors.SourceNotFound(what=f"{name} (not listed in {sums_url})",
                                fix="check the version on https://www.kernel.org (e.g. kernel.org:6.12.117)")


def _fetch_tarball(cache: Cache, spec: SourceSpec, progress: bool) -> Tree:
    if not _is_url(spec.value):
        return _from_local_tarball(cache, Path(spec.value), spec.sha256,
                                   f"tarball:{spec.value}", progress)
    # Unpinned URLs are assumed immutable too: the first verified download is reused.
    sha = spec.sha256 or cache.recorded_sha(spec.value)
    return _fetch_url(cache, spec.value, sha, f"tarball:{spec.value}", progress)


def _fetch_url(cache: Cache, url: str, sha: str | None, origin: str, progress: bool) -> Tree:
    """Tree of the tarball at ``url`` (sha256 ``sha`` if known), downloading only if needed."""
    if sha:
        root = cache.lookup(sha[:16])
        if root is not None:
            echo(f"reusing cached tree {root}")
            return _cached_tree(root, sha[:16], origin, cache.kind)
    name = _url_file_name(url)
    tarball = cache.download_path(name, sha) if sha else None
    if tarball is None or not tarball.is_file():
        tarball, sha = download(url, cache, name, sha, progress=progress)
    assert sha is not None
    try:
        tree = _tree_from_tarball(cache, tarball, sha, origin, progress)
    except errors.UserError:
        cache.forget(url, tarball)
        raise
    cache.record_sha(url, sha)
    return tree


def _url_file_name(url: str) -> str:
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^\w.+-]", "_", name) or "source.tar"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def download(url: str, cache: Cache, name: str, expected: str | None, *,
             progress: bool = True) -> tuple[Path, str]:
    """Download ``url`` into ``downloads/`` via a part file, verifying ``expected`` sha256
    if given; return (path, sha256)."""
    fd, part_name = tempfile.mkstemp(prefix=".part-", dir=cache.downloads)
    os.close(fd)
    part = Path(part_name)
    try:
        sha = _stream(url, part, name, progress)
        if expected and sha != expected:
            raise errors.ChecksumMismatch(name=name, actual=sha, expected=expected)
        final = cache.download_path(name, sha)
        os.rename(part, final)
        return final, sha
    finally:
        part.unlink(missing_ok=True)


def _stream(url: str, part: Path, name: str, progress: bool) -> str:
    """Stream ``url`` into ``part``; return its sha256; detect truncation."""
    h = hashlib.sha256()
    done = 0
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT,
                          headers={"Accept-Encoding": "identity"}) as resp, open(part, "wb") as fh:
            _check_status(resp, url)
            total = _content_length(resp)
            bar = Progress(name, total, enabled=progress)
            for chunk in resp.iter_content(CHUNK):
                fh.write(chunk)
                h.update(chunk)
                done += len(chunk)
                bar.update(done)
            bar.finish(done)
    except requests.RequestException as exc:
        raise _fetch_failed(url, exc) from exc
    except OSError as exc:
        raise errors.FetchFailed(url=url, reason=f"writing {part}: {exc.strerror or exc}",
                                 fix="check free space and permissions of the cache dir") from exc
    if total is not None and done != total:
        raise errors.FetchFailed(url=url, reason=f"truncated download: got {done} of {total} bytes",
                                 fix="retry (nothing was kept)")
    return h.hexdigest()


def _content_length(resp: requests.Response) -> int | None:
    if resp.headers.get("Content-Encoding", "identity") != "identity":
        return None
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _check_status(resp: requests.Response, url: str) -> None:
    if resp.status_code in (404, 410):
        raise errors.SourceNotFound(what=f"{url} (HTTP {resp.status_code})",
                                    fix="check the URL or version")
    if resp.status_code != 200:
        raise errors.FetchFailed(url=url, reason=f"HTTP {resp.status_code} {resp.reason}",
                                 fix="retry later or use another mirror")


def _fetch_failed(url: str, exc: Exception) -> errors.FetchFailed:
    reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    return errors.FetchFailed(url=url, reason=reason,
                              fix="check the network and the URL, then retry (nothing was kept)")


@dataclass
class Progress:
    """A plain-text progress line on stderr: redrawn on a tty, else every 25%."""

    label: str
    total: int | None
    enabled: bool = True
    tty: bool = field(default_factory=lambda: sys.stderr.isatty())
    started: float = field(default_factory=time.monotonic)
    _drawn: float = 0.0
    _quarter: int = 0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= 0.2:
                self._drawn = now
                print(f"\r  {self._text(done)}", end="", file=sys.stderr, flush=True)
        elif self.total:
            quarter = done * 4 // self.total
            if quarter > self._quarter and quarter < 4:
                self._quarter = quarter
                echo(f"  {self._text(done)}")

    def finish(self, done: int) -> None:
        if self.enabled:
            took = time.monotonic() - self.started
            end = "\r" if self.tty else ""
            print(f"{end}  {self.label}: {done / 1e6:.1f} MB in {took:.1f}s" + " " * 10,
                  file=sys.stderr, flush=True)

    def _text(self, done: int) -> str:
        if self.total:
            return f"{self.label}: {done / 1e6:.1f}/{self.total / 1e6:.1f} MB {100 * done // self.total}%"
        return f"{self.label}: {done / 1e6:.1f} MB"


# --- one package of a Debian archive suite -----------------------------------

@contextlib.contextmanager
def _part_file(cache: Cache, suffix: str = "") -> Iterator[Path]:
    """A fresh ``.part-*`` file in ``downloads/`` (removed on exit unless renamed away)."""
    fd, name = tempfile.mkstemp(prefix=".part-", suffix=suffix, dir=cache.downloads)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def _part_download(cache: Cache, url: str, name: str, progress: bool) -> Iterator[tuple[Path, str]]:
    """``url`` streamed into a ``.part-*`` file: (its path, its sha256); removed on exit."""
    with _part_file(cache) as part:
        yield part, _stream(url, part, name, progress)


@dataclass(frozen=True)
class _Archive:
    """``debian-archive:SUITE/PACKAGE[=VERSION]`` from ``mirror``, trusted through ``keyring``:
    InRelease (gpgv) -> Packages.xz (sha256, size) -> .deb (sha256, size) -> the
    ``usr/src/PACKAGE.tar.*`` in it, extracted like any tarball.

    What a fetch resolved is recorded in ``downloads/debarchive-<key>.json`` for the
    spec as written and for the exact version, with the sha256 of the tarball kept in
    ``downloads/``: a later fetch of the same spec is offline.  An unpinned spec keeps
    the version its first fetch found; pin ``=VERSION`` to move to another one."""

    cache: Cache
    mirror: str
    keyring: Path
    progress: bool

    def fetch(self, spec: SourceSpec) -> Tree:
        suite, package = spec.value.split("/", 1)
        hit = self._reuse(suite, package, spec.ref)
        if hit is None:
            entry = self._resolve(suite, package, spec.ref)
            hit = self._reuse(suite, package, entry.version) or self._download(suite, entry)
            self._record(suite, package, entry.version, hit[1])
            self._record(suite, package, spec.ref, hit[1])
        return hit[0]

    # -- records of what was verified before --

    def _record_path(self, suite: str, package: str, version: str | None) -> Path:
        key = _sha_text(f"debian-archive\0{self.mirror}\0{suite}\0{package}\0{version or ''}")
        return self.cache.downloads / f"debarchive-{key[:16]}.json"

    def _record(self, suite: str, package: str, version: str | None, rec: dict[str, str]) -> None:
        _write_atomic(self._record_path(suite, package, version), json.dumps(rec, sort_keys=True) + "\n")

    def _read(self, suite: str, package: str, version: str | None) -> dict[str, str] | None:
        try:
            rec = json.loads(self._record_path(suite, package, version).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in _RECORD_KEYS):
            return None
        if not _SHA256_RE.match(rec["sha256"]) or "/" in rec["tarball"]:
            return None
        return rec

    def _origin(self, suite: str, package: str, rec: dict[str, str]) -> str:
        return f"debian-archive:{suite}/{package}={rec['version']} ({self.mirror}/{rec['filename']})"

    def _reuse(self, suite: str, package: str,
               version: str | None) -> tuple[Tree, dict[str, str]] | None:
        """The tree a previous fetch verified for (suite, package, version), offline."""
        rec = self._read(suite, package, version)
        if rec is None:
            return None
        sha, origin = rec["sha256"], self._origin(suite, package, rec)
        root = self.cache.lookup(sha[:16])
        if root is not None:
            echo(f"reusing cached tree {root} ({package} {rec['version']} from {suite})")
            return _cached_tree(root, sha[:16], origin), rec
        tarball = self.cache.download_path(rec["tarball"], sha)
        if not tarball.is_file():
            return None
        try:
            return _tree_from_tarball(self.cache, tarball, sha, origin, self.progress), rec
        except errors.UserError:
            tarball.unlink(missing_ok=True)
            raise

    # -- the chain: InRelease -> Packages -> .deb --

    def _resolve(self, suite: str, package: str, pin: str | None) -> debarchive.Entry:
        """The verified Packages stanza of ``package`` (version ``pin``, else the highest)."""
        with tempfile.TemporaryDirectory(prefix="ovl-debarchive-") as work:
            release = self._release(suite, Path(work))
        listed = [p for p in debarchive.index_paths() if p in release.sha256]
        if not listed:
            raise errors.ArchiveInconsistent(
                mirror=self.mirror, suite=suite,
                what=f"its InRelease lists none of {', '.join(debarchive.index_paths())}",
                fix="check the suite name and the mirror")
        similar: list[str] = []
        for path in listed:
            text = self._index(release, path)
            entries = debarchive.package_entries(text, package)
            if entries:
                return self._choose(suite, package, pin, entries)
            similar += debarchive.similar_packages(text, package)
        there = ", ".join(dict.fromkeys(similar)) or "no similar names"
        raise errors.SourceNotFound(
            what=f"package {package} in {suite} of {self.mirror} (there: {there})",
            fix=f"check the package name and the suite (searched {', '.join(listed)})")

    def _choose(self, suite: str, package: str, pin: str | None,
                entries: list[debarchive.Entry]) -> debarchive.Entry:
        entry = debarchive.choose(entries, pin)
        if entry is None:
            versions = ", ".join(sorted({e.version for e in entries}, key=debarchive.version_key))
            raise errors.SourceNotFound(
                what=f"version {pin} of {package} in {suite} of {self.mirror} (there: {versions})",
                fix=f"pin one of those (debian-archive:{suite}/{package}=VERSION) or drop the pin")
        echo(f"{package} {entry.version} in {suite}: {entry.filename} ({entry.size / 1e6:.1f} MB)")
        return entry

    def _release(self, suite: str, work: Path) -> debarchive.Release:
        if not self.keyring.is_file():
            raise errors.MissingTool(tool=f"keyring {self.keyring}", package="debian-archive-keyring")
        url = f"{self.mirror}/dists/{suite}/InRelease"
        try:
            with _part_download(self.cache, url, "InRelease", False) as (part, _):
                text, signers = debarchive.verify_inrelease(part, self.keyring, work, suite=suite, url=url)
        except errors.SourceNotFound as exc:
            raise errors.SourceNotFound(what=f"suite {suite} on {self.mirror} (no {url})",
                                        fix="check the suite name (e.g. sid, trixie-backports) "
                                            "and the mirror") from exc
        echo(f"InRelease of {suite} verified: signed by {', '.join(signers)}")
        return debarchive.parse_release(text, suite, url, signers)

    def _index(self, release: debarchive.Release, path: str) -> str:
        """The text of Packages index ``path``, its sha256 and size checked against InRelease."""
        sha, size = release.sha256[path]
        url = f"{self.mirror}/dists/{release.suite}/{path}"
        urls = [f"{url.rsplit('/', 1)[0]}/by-hash/SHA256/{sha}", url] if release.by_hash else [url]
        for i, candidate in enumerate(urls):
            try:
                with _part_download(self.cache, candidate, path, self.progress) as (part, got):
                    self._check(path, candidate, part, got, sha, size, f"the InRelease of {release.suite}")
                    data = part.read_bytes()
                break
            except errors.SourceNotFound:
                if i == len(urls) - 1:
                    raise
        try:
            return debarchive.decompress_index(data)
        except ValueError as exc:
            raise errors.ArchiveInconsistent(mirror=self.mirror, suite=release.suite,
                                             what=f"{path} is unreadable: {exc}",
                                             fix="report it to the mirror; nothing was kept") from exc

    @staticmethod
    def _check(name: str, url: str, part: Path, sha: str, expected: str, size: int,
               listed_in: str) -> None:
        actual_size = part.stat().st_size
        if sha != expected or actual_size != size:
            raise errors.ArchiveChecksumMismatch(name=name, url=url, actual=sha, size=actual_size,
                                                 expected=expected, listed_size=size,
                                                 listed_in=listed_in)

    def _download(self, suite: str, entry: debarchive.Entry) -> tuple[Tree, dict[str, str]]:
        """Download and verify the .deb, take its source tarball out, extract that."""
        url = f"{self.mirror}/{entry.filename}"
        name = _url_file_name(url)
        with _part_download(self.cache, url, name, self.progress) as (deb, sha):
            self._check(name, url, deb, sha, entry.sha256, entry.size, f"the Packages index of {suite}")
            with _part_file(self.cache, suffix=f"-{entry.package}.tar") as part:
                try:
                    tarball, tsha = debarchive.extract_source_tarball(deb, entry.package, part)
                except ValueError as exc:
                    raise errors.ArchiveInconsistent(
                        mirror=self.mirror, suite=suite, what=f"{name} holds no usable source: {exc}",
                        fix="use a linux-source-X.Y package; nothing was kept") from exc
                deb.unlink()
                rec = {"version": entry.version, "filename": entry.filename, "tarball": tarball,
                       "sha256": tsha, "deb_sha256": sha}
                tree = _tree_from_tarball(self.cache, part, tsha, self._origin(suite, entry.package, rec),
                                          self.progress)
                os.rename(part, self.cache.download_path(tarball, tsha))
        return tree, rec


# --- extraction --------------------------------------------------------------

def extract(tarball: Path, dest: Path, *, progress: bool = True, kind: "TreeKind | None" = None) -> Path:
    """Safely extract a one-top-dir tarball (a kernel tree unless ``kind`` says otherwise)
    into ``dest``; return the tree's root.

    Uses :mod:`tarfile` with the ``data`` filter plus stricter checks (no
    absolute names, no ``..``, a single top-level directory).  On error the
    caller removes ``dest``.
    """
    guard = _MemberGuard(tarball)
    start = time.monotonic()
    if progress:
        echo(f"extracting {tarball} ...")
    try:
        with tarfile.open(tarball, "r:*") as tf:
            tf.errorlevel = 1
            tf.extractall(dest, filter=guard)
    except tarfile.FilterError as exc:
        member = exc.tarinfo.name if exc.tarinfo is not None else "?"
        raise errors.UnsafeArchive(path=tarball, member=member, reason=str(exc)) from exc
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise _corrupt(tarball, exc) from exc
    except OSError as exc:
        if exc.errno is None:  # gzip.BadGzipFile, bz2 "Invalid data stream"
            raise _corrupt(tarball, exc) from exc
        raise errors.ExtractFailed(path=tarball, dest=dest, reason=exc.strerror or str(exc),
                            fix="check free space and permissions of the cache dir") from exc
    root = dest / guard.top_name(tarball)
    if kind is not None and kind is not KERNEL:
        if kind.version(root) is None:
            raise errors.CorruptTarball(path=tarball, reason=f"not a {kind.name}", fix=kind.fix)
    elif read_version(root) is None:
        raise errors.CorruptTarball(path=tarball, reason="not a kernel tree: no VERSION/PATCHLEVEL "
                                    "in the top-level Makefile", fix="use a Linux kernel source tarball")
    if progress:
        echo(f"extracted {guard.count} members in {time.monotonic() - start:.1f}s")
    return root


def _corrupt(tarball: Path, exc: BaseException) -> errors.CorruptTarball:
    reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]
    return errors.CorruptTarball(path=tarball, reason=reason,
                                 fix="the file is damaged or truncated; delete it and fetch it again")


@dataclass
class _MemberGuard:
    """A tarfile extraction filter: ``data`` filter + no abs/.. names + one top dir."""

    tarball: Path
    tops: set[str] = field(default_factory=set)
    count: int = 0

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        name = member.name
        if name.startswith("/"):
            raise errors.UnsafeArchive(path=self.tarball, member=name, reason="absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise errors.UnsafeArchive(path=self.tarball, member=name, reason="'..' in path")
        filtered = tarfile.data_filter(member, dest)
        if parts:
            if len(parts) == 1 and not member.isdir():
                raise errors.CorruptTarball(path=self.tarball,
                                            reason=f"top-level non-directory {name!r}",
                                            fix="use a kernel tarball with a single top-level directory")
            self.tops.add(parts[0])
        self.count += 1
        return filtered

    def top_name(self, tarball: Path) -> str:
        if len(self.tops) != 1:
            found = ", ".join(sorted(self.tops)[:3]) or "nothing"
            raise errors.CorruptTarball(path=tarball,
                                        reason=f"expected one top-level directory, found {found}",
                                        fix="use a kernel tarball with a single top-level directory")
        return next(iter(self.tops))


# --- git ---------------------------------------------------------------------

def _fetch_git(cache: Cache, spec: SourceSpec, progress: bool) -> Tree:
    url, ref = spec.value, spec.ref or "HEAD"
    _check_git_args(url, ref)
    origin = f"git:{url}@{ref}"
    commit = resolve_remote_ref(url, ref)
    if commit is None and _FULL_COMMIT_RE.match(ref):
        commit = ref.lower()
    if commit is not None:
        key = _git_key(url, commit)
        root = cache.lookup(key)
        if root is not None:
            echo(f"reusing cached tree {root} ({commit[:12]})")
            return _cached_tree(root, key, f"{origin} ({commit[:12]})", cache.kind)
    commits: list[str] = []
    kind = cache.kind or KERNEL

    def make(tmp: Path) -> tuple[Path, str]:
        work = tmp / ("linux" if kind is KERNEL else "src")
        commits.append(_git_checkout(work, url, ref, progress))
        if kind.version(work) is None:
            raise errors.BadArgument(what=f"{url}@{ref} is not a {kind.name}",
                                     fix=f"point git: at the right repository ({kind.fix})")
        return work, _git_key(url, commits[0])

    root, key = cache.build(make)
    return _cached_tree(root, key, f"{origin} ({commits[0][:12]})", cache.kind)


def _git_key(url: str, commit: str) -> str:
    return _sha_text(f"git\0{url}\0{commit}")[:16]


def resolve_remote_ref(url: str, ref: str) -> str | None:
    """The commit ``ref`` (tag, branch, HEAD) names on ``url``, or None if it is no ref."""
    res = run(["git", "ls-remote", url, ref, f"{ref}^{{}}"], env=GIT_ENV, check=False)
    if not res.ok:
        raise errors.FetchFailed(url=url, reason=f"git ls-remote failed: {tail(res.stderr, 2)}",
                                 fix="check the URL and that the server is reachable")
    refs = dict(line.split("\t", 1)[::-1] for line in res.stdout.splitlines() if "\t" in line)
    full = ref == "HEAD" or ref.startswith("refs/")
    names = [ref] if full else [f"refs/tags/{ref}", f"refs/heads/{ref}"]
    for name in names:
        commit = refs.get(f"{name}^{{}}") or refs.get(name)
        if commit:
            return commit
    return None


def _git_checkout(work: Path, url: str, ref: str, progress: bool) -> str:
    """Fetch ``ref`` of ``url`` into a new repo ``work`` (depth 1 if possible); return HEAD."""
    loud = progress and sys.stderr.isatty()
    quiet = [] if loud else ["-q"]
    run(["git", "init", "-q", work])
    git = ["git", "-C", work]
    res = run([*git, "fetch", *quiet, "--depth", "1", url, ref], env=GIT_ENV, check=False,
              capture=not loud)
    target = "FETCH_HEAD"
    if not res.ok:
        if not _COMMIT_RE.match(ref):
            why = tail(res.stderr, 1) or "fetch failed"
            raise errors.SourceNotFound(what=f"ref {ref!r} in {url} ({why})",
                                        fix=f"check the branch/tag with `git ls-remote {url}`")
        echo("the server refused a depth-1 fetch of a commit; fetching the full history")
        res = run([*git, "fetch", *quiet, url, "+refs/heads/*:refs/remotes/origin/*",
                   "+refs/tags/*:refs/tags/*"], env=GIT_ENV, check=False, capture=not loud)
        if not res.ok:
            raise errors.FetchFailed(url=url, reason=f"git fetch failed: {tail(res.stderr, 2)}",
                                     fix="check the URL and that the server is reachable")
        target = ref
    if not run([*git, "rev-parse", "-q", "--verify", f"{target}^{{commit}}"], check=False).ok:
        raise errors.SourceNotFound(what=f"commit {ref!r} in {url}",
                                    fix=f"check the commit id (git ls-remote {url} lists branches and tags)")
    run([*git, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", target])
    return run([*git, "rev-parse", "HEAD"]).stdout.strip()
