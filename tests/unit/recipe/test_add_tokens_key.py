"""model.add_tokens in the schema: its two entry shapes, the resolved recipe that loads back to
itself (and leaves the key out where a recipe adds nothing), and the problems it reports."""

from __future__ import annotations

import yaml

from ftcli.recipe import AddedTokenSpec, recipe_from_mapping
from tests.unit.recipe.samples import mapping, problems


def _with_tokens(tokens, method=None):
    return mapping(method=method, model={"name": "m", "add_tokens": tokens})


def test_strings_and_mappings_resolve_and_round_trip():
    r = recipe_from_mapping(_with_tokens(["zebrafoo", {"content": "<|tool|>", "special": True}]))
    assert r.model.added_tokens == [
        AddedTokenSpec(content="zebrafoo"),
        AddedTokenSpec(content="<|tool|>", special=True),
    ]
    doc = yaml.safe_load(r.to_yaml())
    assert doc["model"]["add_tokens"] == ["zebrafoo", {"content": "<|tool|>", "special": True}]
    assert recipe_from_mapping(doc).to_yaml() == r.to_yaml()


def test_a_recipe_without_tokens_does_not_write_the_key():
    r = recipe_from_mapping(mapping())
    assert "add_tokens" not in yaml.safe_load(r.to_yaml())["model"]
    assert r.model.added_tokens == []


def test_bad_token_lists_are_located_problems():
    assert any("twice" in p for p in problems(_with_tokens(["<x>", {"content": "<x>"}])))
    assert any("at least one token" in p for p in problems(_with_tokens([])))
    assert any("empty" in p for p in problems(_with_tokens(["  "])))
    found = problems(_with_tokens(["<x>"], method={"kind": "ptuning"}))
    assert any(p.startswith("model.add_tokens") and "lora" in p for p in found), found
