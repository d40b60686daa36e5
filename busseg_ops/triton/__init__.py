"""Triton backend: one module per op holding its kernels, launchers (torch.library.triton_op,
so torch.compile sees through them) and autograd. Imported only when triton is installed."""

from . import arp, cra, phnet  # noqa: F401
