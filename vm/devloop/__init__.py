"""The kernel developer's loop (issue 13).

- :mod:`vm.devloop.series`: the series as a git branch (``invoke series checkout|export``);
- :mod:`vm.devloop.trees`: ``invoke test --source tree:DIR`` on such a branch: the work
  tree as P, its base commit as B, both built incrementally;
- :mod:`vm.devloop.loop`: ``invoke retest``, the inner loop on one running guest.
"""

from vm.devloop.series import (  # noqa: F401
    ExportResult, default_onto, default_worktree, series_checkout, series_export,
)
from vm.devloop.trees import detect, test_tree, tree_of  # noqa: F401,E402


def series_tree(source: str | None):
    """The series work tree ``source`` (``tree:DIR``) names, or None (any other source)."""
    path = tree_of(source)
    return detect(path) if path is not None else None


def require_series_tree(tree) -> "SeriesTree":  # noqa: F821
    """The series work tree at ``tree``, or a one-line error saying why it is not one."""
    from pathlib import Path

    from vm import errors

    path = Path(tree).expanduser().resolve()
    found = detect(path)
    if found is None:
        why = ("no such directory" if not path.is_dir() else
               "not the top of a git work tree, a detached HEAD, or a branch without the cover-letter "
               "commit of `invoke series checkout`")
        raise errors.NotASeriesTree(tree=path, why=why)
    return found
