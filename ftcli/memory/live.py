"""The peak of live tensor bytes over a block of code, counted op by op: what an allocator must hold
at once, whatever the allocator keeps besides (glibc's heap retention makes a CPU process's
resident memory a poor and environment-dependent measure of it)."""

from __future__ import annotations

import weakref


class LiveTensors:
    """``with LiveTensors(exclude=model.parameters()) as live: ...``; then ``live.peak`` (bytes).

    Every tensor storage an op creates inside the block counts from its creation until it is
    collected. Storages of ``exclude`` (and any tensor made before the block) are not counted:
    a view of a parameter is not new memory. Tensors built outside the dispatcher (from numpy,
    a safetensors mmap) are not seen, so this measures steps, not model loading."""

    def __init__(self, exclude=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    tracker._track(t)
                return out

        self._mode = _Mode()
        self._live = {t.untyped_storage().data_ptr(): 0 for t in exclude}
        self.now = self.peak = 0

    def __enter__(self) -> LiveTensors:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _track(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in self._live:
            return
        self._live[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.now -= self._live.pop(key, 0)
