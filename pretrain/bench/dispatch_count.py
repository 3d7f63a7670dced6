"""Count what a step dispatches: aten operators and host syncs, deterministically, on any device.

A step that is slow on a GPU because of the host shows two things that do not need a GPU to
count: how many operators the host dispatches (each one is Python + dispatcher + a kernel launch)
and how often the host reads a value the device computed (each read waits for every kernel queued
before it, so the host can no longer run ahead). Both dispatch on the CPU too, so
:class:`DispatchCounter` counts them on the CPU proxy exactly as they would happen on a GPU.

Host syncs counted:

- aten operators whose result is a host value or whose output shape depends on device data:
  ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``), ``is_nonzero``,
  ``equal``, ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without
  ``output_size``, and indexing with a boolean mask;
- ``Tensor.tolist()``, which reads the data without dispatching any operator;
- the accelerator's ``synchronize()`` (DeepSpeed's ``get_accelerator().synchronize``, a no-op on
  the CPU, a full device sync on a GPU).

Not counted: reading host memory that a collective or an asynchronous copy wrote (a numpy view of
a CPU buffer, see :mod:`pretrain.stepstats`), which never waits for the device's queue.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that hand a device value to the host (or size their output by one).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique",
    "_unique2", "unique_consecutive", "unique_dim",
})
TOLIST = "Tensor.tolist"
ACCELERATOR_SYNC = "accelerator.synchronize"


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and len(args) < 4
    if name == "index":  # t[mask]: the output size is the mask's count
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class DispatchCounter(TorchDispatchMode):
    """Counts dispatched aten operators and host syncs (by name) while active; reusable.

    ``with DispatchCounter() as c: step()`` then ``c.ops`` / ``c.syncs`` (totals) and
    ``c.op_names`` / ``c.sync_names`` (Counters). Thread-local like every dispatch mode: work in
    other threads (the loader's prefetch thread) is not counted, as it is not the step's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.op_names: Counter[str] = Counter()
        self.sync_names: Counter[str] = Counter()
        self._stack = contextlib.ExitStack()

    @property
    def ops(self) -> int:
        return sum(self.op_names.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_names.values())

    def reset(self) -> None:
        self.op_names.clear()
        self.sync_names.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.op_names[name] += 1
        if _is_sync(name, args, kwargs):
            self.sync_names[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._stack.enter_context(_patched(torch.Tensor, "tolist", self._count_python(TOLIST)))
        accelerator = _accelerator()
        if accelerator is not None:
            self._stack.enter_context(_patched(accelerator, "synchronize", self._count_python(ACCELERATOR_SYNC)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    def _count_python(self, name: str):
        def hook(original):
            def counted(*args, **kwargs):
                self.sync_names[name] += 1
                return original(*args, **kwargs)
            return counted
        return hook


@contextlib.contextmanager
def _patched(owner, attr: str, wrap) -> Iterator[None]:
    """``owner.attr`` wrapped while inside; afterwards exactly as before (class or instance)."""
    own = attr in vars(owner)
    original = getattr(owner, attr)
    setattr(owner, attr, wrap(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


def _accelerator():
    """DeepSpeed's accelerator object when deepspeed is already loaded (never imports it)."""
    accel_mod = sys.modules.get("deepspeed.accelerator")
    if accel_mod is None:
        return None
    return accel_mod.get_accelerator()
