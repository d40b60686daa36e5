"""The public ops, one module per op (``ops/<op>.py``): argument validation, the backend dispatch,
the fake kernels and the autograd of ``busseg::<op>``, and a docstring with the math. The
functions are exported from the top-level ``busseg_ops`` package."""
