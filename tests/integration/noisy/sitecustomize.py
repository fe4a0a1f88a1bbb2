"""Test helper, put on PYTHONPATH: makes bitsandbytes take its AVX512-BF16 CPU path on any CPU.

On CPUs with that instruction, importing bitsandbytes asks the ``kernels`` package for a hub
kernel; offline, ``kernels`` and bitsandbytes each log a warning through Python logging, which
reached the user's terminal before ftcli's own first line (transformers 5.25 brought ``kernels``
in). Under ftcli, ``kernels`` is not importable there (ftcli/_imports.py), and bitsandbytes still
logs its own warning. Development and CI machines differ in that instruction, so the test forces
the real path.
"""

import importlib.abc
import importlib.util
import sys


class _ClaimAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _ClaimAvx512Bf16())
