"""Plain-PyTorch implementations of every op, one module per op (``reference/<op>.py``): the
executable form of docs/ops.md, the oracle for the tests and the ``reference`` backend on any
device. Each takes the arguments of the native op ``busseg::<op>`` and returns what it returns."""
