"""ftcli's own ``evaluate`` metric modules, shipped as package data and loaded by path.

``evaluate.load("exact_match")`` needs the hub; ``evaluate.load(<folder>)`` does not
(docs/traps.md#metrics-that-need-the-hub).
Each folder holds one module named after it; ``ftcli.evaluation.metrics.load_metric`` loads them.
"""
