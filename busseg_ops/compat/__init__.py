"""Drop-in replacements for the functions and modules of the papers' public code, with the same
names, signatures and return structures, backed by busseg_ops' ops (docs/porting.md):

- ``busseg_ops.compat.rabusseg``: RA-BUSSeg (dodooo1/RA-BUSSeg) decoder module ``Corr`` and the
  relation losses of ``rabusseg/utils/loss_helper.py``.
- ``busseg_ops.compat.phnet``: PH-Net (jjjsyyy/PH-Net) ``model/patch_helper.py``.

Each module says, per function, where it cannot behave exactly as upstream and why.
"""

from . import phnet, rabusseg

__all__ = ["phnet", "rabusseg"]
