"""One way for every test to prove that a step reads no tensor value on the host.

``forbid_host_reads()`` patches every Python-level reader of a tensor's value to raise
``HostRead`` while the block runs; a step that synchronises with the host trips it.
"""
import contextlib

import torch

READERS = ["item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
           "__array__", "__format__", "__repr__", "__str__"]


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_reads():
    saved = {name: getattr(torch.Tensor, name) for name in READERS}

    def reader(name):
        def boom(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name} called during the step")
        return boom

    try:
        for name in READERS:
            setattr(torch.Tensor, name, reader(name))
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def forbid_cuda_sync():
    """On a GPU: any CUDA call that would wait for the device raises while the block runs."""
    torch.cuda.synchronize()  # work queued before the block is not the block's
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
