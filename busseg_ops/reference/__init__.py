"""Plain-PyTorch implementations of every op: the executable form of SPEC.md, the oracle for the
tests and the fallback backend on any device."""
from .arp import adjacent_relation_propagation

__all__ = ["adjacent_relation_propagation"]
