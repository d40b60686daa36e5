"""Test and benchmark support, kept out of the installed package: support.upstream (the papers'
code restated), support.published (their published files, from $BUSSEG_UPSTREAM_DIR) and
support.memory (peak resident memory). Importable with tests/ on sys.path: pytest puts it there
for the tests (tests/conftest.py), benchmarks/conftest.py for the benchmarks."""
