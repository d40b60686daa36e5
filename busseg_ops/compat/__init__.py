"""Drop-in replacements for the papers' public code, so that a training script written for it
changes only its imports to run on busseg_ops' ops (docs/porting.md): ``busseg_ops.compat.rabusseg``
(dodooo1/RA-BUSSeg) and ``busseg_ops.compat.phnet`` (jjjsyyy/PH-Net)."""

from . import phnet, rabusseg

__all__ = ["phnet", "rabusseg"]
