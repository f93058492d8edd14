"""The tolerance rule itself (tests/tolerance.py) must be able to fail."""

import torch
from tolerance import assert_close_by_rule, judge


def _data():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    b = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    return a, b, a @ b


def test_half_matmul_passes_against_its_own_eager_error():
    a, b, ref = _data()
    eager = (a.half().float() @ b.half().float()).half()  # fp16 inputs, fp32 accumulation, fp16 output
    actual = (a.half().double() @ b.half().double()).half()  # a more accurate kernel on the same inputs
    assert_close_by_rule(actual, ref, eager, name="matmul")


def test_zero_and_nan_and_wrong_results_fail():
    a, b, ref = _data()
    eager = (a.half().float() @ b.half().float()).half()
    assert not judge(torch.zeros_like(eager), ref, eager).ok
    wrong = eager.clone()
    wrong[3, 4] += 0.5
    assert not judge(wrong, ref, eager).ok
    nan = eager.clone()
    nan[0, 0] = float("nan")
    assert not judge(nan, ref, eager).ok
    assert not judge(eager[:-1], ref, eager).ok


def test_nan_where_the_reference_has_nan_is_right_and_a_useless_yardstick_is_refused():
    a, b, ref = _data()
    ref = ref.clone()
    ref[1, 1] = float("nan")
    eager = ref.half()
    assert judge(eager.clone(), ref, eager).ok
    assert not judge(ref.half(), ref, torch.full_like(eager, float("inf"))).ok


def test_mask_restricts_both_errors():
    a, b, ref = _data()
    eager = ref.half()
    actual = eager.clone()
    actual[0] = 0
    mask = torch.ones_like(ref, dtype=torch.bool)
    mask[0] = False
    assert not judge(actual, ref, eager).ok
    assert judge(actual, ref, eager, mask=mask).ok


def test_l2_norm_judges_the_whole_tensor():
    a, b, ref = _data()
    eager = (a.half().float() @ b.half().float()).half()
    assert judge(eager.clone(), ref, eager, norm="l2").ok
    assert not judge(torch.zeros_like(eager), ref, eager, norm="l2").ok
    assert not judge(eager * 1.01, ref, eager, norm="l2").ok
