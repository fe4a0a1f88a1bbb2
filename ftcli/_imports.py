"""No hub code at import. On CPUs with AVX512-BF16, importing bitsandbytes (which ``import peft``
does) asks the Hugging Face hub for a compiled CPU kernel (``kernels.get_kernel``): the import
hangs while the hub does not answer, and would run code fetched from it
(docs/traps.md#hub-kernels-at-import). ftcli never loads hub kernels: while that one module of
bitsandbytes runs, ``kernels`` cannot be imported, and bitsandbytes keeps its own kernels.
Light: nothing here imports a library."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

GUARDED = "bitsandbytes.backends.cpu.ops"  # the module that calls kernels.get_kernel at import
BLOCKED = "kernels"


class _Loader(importlib.abc.Loader):
    """The module's own loader, run with ``kernels`` unimportable (its import raises ImportError,
    which bitsandbytes catches: a logged warning, and its bundled kernels)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        had = BLOCKED in sys.modules
        before = sys.modules.get(BLOCKED)
        sys.modules[BLOCKED] = None  # an import of it raises ImportError
        try:
            self.loader.exec_module(module)
        finally:
            if had:
                sys.modules[BLOCKED] = before
            else:
                sys.modules.pop(BLOCKED, None)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds GUARDED as the path finder does, with its loader wrapped (``_Loader``)."""

    def find_spec(self, name, path=None, target=None):
        if name != GUARDED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
