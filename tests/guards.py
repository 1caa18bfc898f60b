"""Dispatch-level guards shared by tests: what an op sequence would do on a CUDA device, checked on
a CPU."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostSync(TorchDispatchMode):
    """Fails on every op that makes the host wait for the device on CUDA: reading a value
    (``.item()``, ``bool()``, ``int()``), an op whose output size depends on the values, or a
    boolean index. With ``index_tensors``, every advanced index too (``t[[0, 2]]``, ``t[idx]``) and
    every tensor made from Python data: on CUDA the index or the data is built on the host and
    copied from pageable memory, which synchronises the stream (a path that needs an index made on
    the device cannot use this option)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
               "aten::masked_select", "aten::masked_scatter", "aten::unique_consecutive", "aten::_unique",
               "aten::_unique2", "aten::unique_dim", "aten::bincount", "aten::histc",
               "aten::repeat_interleave", "aten::allclose"}
    INDEXING = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
    FROM_HOST_DATA = {"aten::lift_fresh", "aten::lift_fresh_copy", "aten::lift"}

    def __init__(self, index_tensors: bool = False):
        super().__init__()
        self.index_tensors = index_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        indices = [i for i in (args[1] or ()) if isinstance(i, torch.Tensor)] if name in self.INDEXING else []
        boolean_index = any(i.dtype == torch.bool for i in indices)
        value_fill = name == "aten::masked_fill" and isinstance(args[2], torch.Tensor)  # .item() of the value on CUDA
        if name in self.SYNCING or boolean_index or value_fill:
            raise AssertionError(f"{func} makes the host wait for the device")
        if self.index_tensors and (indices or name in self.FROM_HOST_DATA):
            raise AssertionError(f"{func} makes the host wait for the device: an index or data from the host")
        return func(*args, **kwargs)
