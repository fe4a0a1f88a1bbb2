"""Evaluation: ``metrics`` (the one metric vocabulary), ``score`` (the pipeline's evaluate stage
and per-example outputs), ``stats`` (paired bootstrap, McNemar, permutation, verdicts),
``baseline`` (the base as the run started, the linear probe), ``failures``, ``overfit``,
``robustness``, ``compare`` (``ftcli eval --baseline``), ``ensemble`` and ``report`` (report.json /
.md / .html). Its forward passes (probabilities, token losses, generation) are ``ftcli.forward``,
shared with training and serving.
"""
