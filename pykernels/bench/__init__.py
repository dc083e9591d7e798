"""Benchmarks run by `pykernels bench`.

Every module in this package whose name has no leading underscore is a suite: it defines
`cases(ctx: BenchContext) -> list[Case]` and `OPS`, the op tables its cases
fill, and is found automatically.
See _core.py for Case and the timing rules, _runner.py for the tables and files.
"""
