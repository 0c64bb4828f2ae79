"""Error hierarchy.

Every error the harness raises on purpose is a :class:`HarnessError`.  Its
message is one line that names the cause and the fix, built from a template
(tuxmake style), so the CLI can print ``str(err)`` and exit non-zero without a
traceback.  :class:`UserError` means the input was wrong (a patch that does not
apply, a missing config option, a corrupt tarball); :class:`InfraError` means
the machine or a tool misbehaved (QEMU hung, SSH unreachable, a build broke).
"""

from __future__ import annotations

from pathlib import Path


class HarnessError(Exception):
    """Base class: ``message`` is a ``str.format`` template filled from kwargs."""

    message = "{cause}; fix: {fix}"
    exit_code = 2

    def __init__(self, **kwargs: object) -> None:
        self.fields = kwargs
        try:
            text = self.message.format(**kwargs)
        except (KeyError, IndexError):  # pragma: no cover - template bug
            text = f"{type(self).__name__}: {kwargs!r}"
        super().__init__(text)


class UserError(HarnessError):
    """The input was wrong; the user can fix it."""

    exit_code = 2


class InfraError(HarnessError):
    """A tool, the machine or the guest failed; not the user's input."""

    exit_code = 3


# --- user errors -------------------------------------------------------------

class MissingTool(UserError):
    message = "{tool} is not installed; fix: run `invoke setup` (or apt-get install {package})"


class SourceNotFound(UserError):
    message = "kernel source {what} not found; fix: {fix}"


class ChecksumMismatch(UserError):
    message = ("sha256 of {name} is {actual}, published checksum is {expected}; "
               "fix: the download is corrupt or tampered with, nothing was kept, retry or use another mirror")


class CorruptTarball(UserError):
    message = "{path} is not a usable source tarball ({reason}); fix: {fix}"


class UnsafeArchive(UserError):
    message = "{path} has an unsafe member {member!r} ({reason}); fix: use a trusted kernel tarball"


class SeriesError(UserError):
    message = "{series}: {reason}; fix: {fix}"


class PatchDoesNotApply(UserError):
    message = ("{patch} does not apply to {tree}: {detail}; "
               "fix: rebase the patch onto this base (the tree was left untouched)")


class ConfigOptionsDropped(UserError):
    message = ("kconfig dropped {count} requested option(s) {when}: {options}; "
               "fix: {fix}")


class BadFragment(UserError):
    message = "config fragment {path}: {reason}; fix: {fix}"


class BadArgument(UserError):
    message = "{what}; fix: {fix}"


# --- infrastructure errors ---------------------------------------------------

class CommandFailed(InfraError):
    message = "`{cmd}` exited {rc}{detail}; fix: {fix}"


class FetchFailed(InfraError):
    message = "could not fetch {url}: {reason}; fix: {fix}"


class BuildFailed(InfraError):
    message = "kernel build failed in {build_dir} ({reason}); fix: see {log} for the full log"


class ImageBuildFailed(InfraError):
    message = "guest image build failed ({reason}); fix: {fix}"


class AccelUnavailable(InfraError):
    message = "no usable QEMU accelerator: {reason}; fix: {fix}"


class GuestBootFailed(InfraError):
    message = "guest {reason}; fix: {fix} (console: {console})"


class SSHUnreachable(InfraError):
    message = "cannot reach the guest over SSH at {host}:{port} ({reason}); fix: {fix}"


class GuestNotRunning(InfraError):
    message = "no guest is running ({reason}); fix: start one with `invoke boot --detach`"


class RunDirBusy(InfraError):
    message = ("guest run dir {path} is in use by another harness process (its lock is held); "
               "fix: boot into a fresh run dir (vm.pipeline.run_dir), or wait for that run to end")


class SSHPortTaken(InfraError):
    """QEMU could not bind the chosen SSH port (another process took it after it was
    found free); :meth:`vm.machine.guest.Guest.boot` retries with another port."""

    message = ("QEMU could not bind SSH port 127.0.0.1:{port} (taken by another process; see {qemu_log}); "
               "fix: retry, or find what holds so many local ports (ss -ltnp)")


class KvmHang(InfraError):
    """Internal signal: the KVM guest printed nothing; the caller falls back to TCG."""

    message = "KVM guest printed nothing in {seconds:.0f}s (hangs in firmware or QEMU died); fix: use --accel tcg"


class SuiteFailed(HarnessError):
    """A verdict, neither the user's input nor the machine: a test session did not
    pass (a case failed or errored, or none ran)."""

    exit_code = 1
    message = ("{name}: {counts} (pytest exited {rc}; failing: {failing}); "
               "fix: read the failures above and {xml}")


class LintFailed(UserError):
    message = ("checkpatch --strict is not clean on {count} patch(es): {patches}; "
               "fix: correct the lines listed above and regenerate the patches")


class StaleCoverLetter(UserError):
    """``path`` is patches/<base>/0000-cover-letter.patch; the fix names that base."""

    message = ("{path} does not match the series{why}; "
               "fix: run `invoke cover-letter --base {base}` and commit the result")

    def __init__(self, *, path: object, why: str = "", **kwargs: object) -> None:
        super().__init__(path=path, base=Path(str(path)).parent.name, why=f" ({why})" if why else "", **kwargs)


# --- ssh -------------------------------------------------------------------

class GuestCommandFailed(InfraError):
    message = "guest command `{cmd}` exited {rc}{detail}; fix: {fix}"


class GuestCommandTimeout(InfraError):
    message = ("guest command `{cmd}` did not finish within {timeout:g}s (its channel was closed); "
               "fix: {fix}")


class SSHAuthFailed(SSHUnreachable):
    """The guest answered but refused the project's key (never worth retrying)."""


class BadKey(UserError):
    message = "SSH key {path} is unusable ({reason}); fix: {fix}"


# --- dm-flakey -------------------------------------------------------------

class FlakeyError(InfraError):
    message = "dm-flakey {name}: {what}; fix: {fix}"


# --- bisect ----------------------------------------------------------------

class BisectFailed(InfraError):
    message = "bisect did not finish: {reason}; fix: {fix}"


class TreeChanged(InfraError):
    message = ("the bisect changed {repo} ({what}); fix: this is a harness bug, "
               "inspect the tree (`git status`, `git worktree list`) and report it")


class BisectBusy(UserError):
    message = "another bisect is using {path}; fix: wait for it to finish or stop it"


# --- fetch -----------------------------------------------------------------

class ExtractFailed(InfraError):
    message = "could not extract {path} into {dest}: {reason}; fix: {fix}"


class CacheUnusable(InfraError):
    message = "cache dir {path} is unusable ({reason}); fix: {fix}"


class ArchiveSignatureInvalid(UserError):
    """A Debian suite's InRelease is not signed by a key of the keyring (or altered)."""

    message = "InRelease of {suite} ({url}) is not signed by a key in {keyring} ({reason}); fix: {fix}"


class ArchiveChecksumMismatch(ChecksumMismatch):
    """A file of the Debian archive chain does not match what its signed parent lists."""

    message = ("{name} from {url} has sha256 {actual} and {size} bytes, {listed_in} lists {expected} "
               "and {listed_size} bytes; fix: the mirror is corrupt, tampered with or mid-update "
               "(nothing was kept), retry later or use another mirror")


class ArchiveInconsistent(UserError):
    message = "Debian archive {mirror} suite {suite}: {what}; fix: {fix}"


# --- console ---------------------------------------------------------------

class ConsoleTimeout(InfraError):
    """The console made no progress before the deadline (the boot code turns it into a GuestBootFailed)."""

    message = "no console progress before the deadline ({path}); fix: raise ovl.boot_timeout or read the log"


# --- scenarios -------------------------------------------------------------

class ExpectationError(UserError):
    """The expectations table (tests/scenarios/expectations.json or a bases/ file) is malformed."""

    message = "{detail}; fix: correct the expectations table"


class ExpectationFailed(AssertionError):
    """A scenario's verdict, not a harness error: a step returned what the table does not
    expect.  An AssertionError so that pytest reports the scenario as *failed* (never as an
    error) and the mutation check can tell the two apart."""


# --- CI shards ---------------------------------------------------------------

class NotAShard(UserError):
    message = ("{path} holds no {manifest} (not the results of `invoke ci --shard NAME`); "
               "fix: pass the directories each shard wrote, results/shards/<shard>/ or a CI artifact of one")


class MixedPlans(UserError):
    message = ("the shards come from different plans ({plans}); fix: merge the shards of one run only "
               "(same commit and settings: `invoke ci --list-shards` prints the plan id)")


class ShardsMissing(UserError):
    message = ("shard(s) {missing} of plan {plan} are missing{unfinished}; fix: pass every shard's results "
               "({count} shards: `invoke ci --list-shards`), or rerun them with `invoke ci --shard NAME`")


class CellConflict(UserError):
    message = ("{count} cell(s) were run twice with different outcomes: {cells}; "
               "fix: a flaky or changed result, rerun those shards and merge the fresh results only")


class ShardsFailed(HarnessError):
    """A verdict: the merged report is written, and some shard did not pass."""

    exit_code = 1
    message = "{count} shard(s) failed: {shards}; fix: read {report} and each shard's results"


class MutationCheckFailed(HarnessError):
    """A verdict: dropping the last patch did not turn exactly the targeted rows red."""

    exit_code = 1
    message = ("mutation check: expected exactly {targeted} to fail as assertions and everything else "
               "to pass; {problems}; fix: read the failures above and results/mutation/")

# --- fstests and unionmount-testsuite ----------------------------------------

class SuitePatchDoesNotApply(UserError):
    message = ("{patch} does not apply to {tree}: {detail}; "
               "fix: rebase it onto that fstests version (nothing was cached)")


class SuiteBuildFailed(InfraError):
    message = "{name} build failed ({reason}); fix: {fix} (full log: {log}; nothing was cached)"


class FstestsMountsBusy(InfraError):
    message = ("{mounts} still mounted after `fuser -km` and `umount` (before fstests on {fs}); "
               "fix: see which process holds them in the console log, or boot a fresh guest")


class SuiteVerdict(HarnessError):
    """A verdict of fstests or unionmount-testsuite (a regression, an unmet expectation)."""

    exit_code = 1
    message = "{name}: {what}; fix: {fix} (report: {report})"

# --- the series as a git branch (invoke series) -----------------------------

class GitIdentityMissing(UserError):
    message = ("git has no {what} in {repo} (commits and patches need the sender's identity); "
               "fix: git -C {repo} config user.name 'Your Name' && git -C {repo} config user.email you@example.org")


class SeriesBranchExists(UserError):
    message = ("branch {branch} already exists in {repo}{where}; fix: work in it and "
               "`invoke series export`, or pass --force to throw it away and check the series out again")


class SeriesBranchMissing(UserError):
    message = "{what} in {repo}; fix: {fix}"


class GitAmFailed(UserError):
    message = ("{patch} does not apply with `git am` onto {onto} ({detail}); fix: pass --onto the commit "
               "the series is based on (its tag, e.g. v7.2.13); nothing was left behind")


class UserTreeChanged(InfraError):
    message = ("`invoke series` changed the checkout of {repo} ({what}); fix: this is a harness bug, "
               "inspect the tree (`git status`, `git worktree list`) and report it")


# --- the developer's inner loop (invoke retest) --------------------------------

class ModuleReloadFailed(InfraError):
    message = ("the new overlay module is not the one the guest loaded ({why}); fix: retest again "
               "(a module that cannot be swapped makes the next retest reboot: `invoke stop` first)")


class LoopGuestBusy(UserError):
    message = ("the loop guest {label} (pid {pid}) is used by another harness run; fix: wait for it, "
               "or stop it with `invoke stop`")


class NotASeriesTree(UserError):
    message = ("{tree} is not a work tree on a series branch ({why}); fix: make one with "
               "`invoke series checkout --tree YOUR_CLONE` and pass the worktree it prints")


def one_line(exc: HarnessError) -> str:
    """What a task prints on stderr for ``exc``: its kind (whose fault), then the message."""
    kind = ("error" if isinstance(exc, UserError) else
            "infrastructure error" if isinstance(exc, InfraError) else "failed")
    return f"{kind}: {exc}"
