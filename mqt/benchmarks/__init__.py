"""The evaluation benchmarks: one module each, listed in `registry` (see its docstring)."""
