"""The tolerance rule of the test suite: at most 2x PyTorch's own eager error in the same dtype (plus one ulp),
against float64. One implementation, shared with the benchmarks: dsc_kernels/experiments/tolerance.py."""

from dsc_kernels.experiments.tolerance import FACTOR, Verdict, assert_close_by_rule, judge

__all__ = ["FACTOR", "Verdict", "assert_close_by_rule", "judge"]
