"""The kernel developer's loop (issue 13).

- :mod:`vm.devloop.series`: the series as a git branch (``invoke series checkout|export``);
- :mod:`vm.devloop.trees`: ``invoke test --source tree:DIR`` on such a branch: the work
  tree as P, its base commit as B, both built incrementally;
- :mod:`vm.devloop.loop`: ``invoke retest``, the inner loop on one running guest.
"""
