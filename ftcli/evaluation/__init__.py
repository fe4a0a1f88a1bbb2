"""``ftcli eval --baseline``: did the fine-tune help, how sure are we, and where does it fail.

Modules: ``metrics`` (task metrics, vectorized forms for resampling), ``stats`` (paired bootstrap,
McNemar, paired permutation, verdicts), ``score`` (per-example outputs of one model on the sealed
test split), ``generate`` (greedy, bounded answers), ``baseline`` (the base as the run started,
the linear probe), ``failures``, ``overfit``, ``robustness``, ``compare`` (the whole comparison),
``report`` (report.json / .md / .html), ``ensemble``, ``cv`` and ``seeds``.
"""
