"""Where a key came from: its line, and duplicate keys that YAML would hide."""

from __future__ import annotations

from tests.unit.recipe.samples import GOOD, messages


def test_duplicate_keys_are_an_error_not_silently_the_last(tmp_path):
    text = GOOD.replace("  epochs: 2\n", "  epochs: 2\n  epochs: 3\n")
    assert messages(tmp_path, text) == [
        f"{tmp_path}/recipe.yaml:16: train.epochs: duplicate key (first set on line 15); "
        "YAML would silently keep the last (remove one of them)"
    ]
