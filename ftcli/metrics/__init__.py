"""ftcli's own ``evaluate`` metric modules, shipped as package data and loaded by path.

``evaluate.load("exact_match")`` needs the hub (TRAPS.md #2); ``evaluate.load(<folder>)`` does not.
Each folder holds one module named after it; ``ftcli.evaluation.metrics.load_metric`` loads them.
"""
