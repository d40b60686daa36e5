"""Triton backend: one module per op (``triton/<op>.py``) holding its kernels and the launchers
``busseg_triton::<op>`` / ``busseg_triton::<op>_backward`` (torch.library.triton_op, so
torch.compile sees through them). Imported by busseg_ops.backends.register when triton is
installed; the op's front-end registers its autograd."""
