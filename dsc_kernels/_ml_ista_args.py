"""Input checks and canonical tensors for ``functional.ml_ista`` and the per-iteration / input-encoder variants of
``functional.conv_ista``: each check raises ``ValueError``/``TypeError`` naming the argument (and the layer).

Canonical forms are those of the ml_ista op (ops/ml_ista.py): dictionaries with a leading step dimension (1 when
shared by every step), an empty tensor for an absent encoder or z0, thresholds (S, C_j) and steps (S,).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _validate as check


def spatial_rank(x: object) -> int:
    """1 or 2, from x's rank (which tells 1-D per-step dictionaries from 2-D shared ones)."""
    x = check.tensor("x", x)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (B, C, L) or (B, C, H, W), got shape {tuple(x.shape)}")
    return x.dim() - 2


def is_per_step(w: object, rank: int) -> bool:
    return isinstance(w, Tensor) and w.dim() == rank + 3


def dictionary(name: str, w: object, rank: int, n_steps: int, steps_name: str) -> Tensor:
    """(C_out, C_in, *k) shared, or (S, C_out, C_in, *k) one per step -> (S_w, C_out, C_in, *k), S_w in {1, S}."""
    w = check.tensor(name, w)
    if w.dim() in (rank + 2, rank + 3) and 0 in w.shape[-rank:]:
        raise ValueError(f"{name} must have a kernel of size >= 1 in every dimension, got {tuple(w.shape)}")
    if w.dim() == rank + 2:
        return w.unsqueeze(0)
    if w.dim() == rank + 3:
        if w.shape[0] != n_steps:
            if rank == 1:  # most often a 2-D weight with an x of rank 3 (unbatched): lead with x's rank
                raise ValueError(
                    f"x is 1-D (B, C, L), so {name} of shape {tuple(w.shape)} reads as {w.shape[0]} per-step 1-D "
                    f"dictionaries, expected {steps_name}={n_steps}; for a 2-D dictionary x must have rank 4: "
                    "(B, C, H, W)"
                )
            raise ValueError(f"{name} holds {w.shape[0]} per-step dictionaries, expected {steps_name}={n_steps}")
        return w
    raise ValueError(
        f"{name} must be (C_out, C_in{', k' * rank}) or per step ({steps_name}, C_out, C_in"
        f"{', k' * rank}) for {rank}-D signals, got shape {tuple(w.shape)}"
    )


def optional_dictionary(name: str, w: object, like: Tensor, rank: int, n_steps: int, steps_name: str) -> Tensor:
    """An encoder of like's per-step shape, or an empty tensor for None."""
    if w is None:
        return like.new_empty(0)
    w = dictionary(name, w, rank, n_steps, steps_name)
    if w.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name} must have the dictionary's shape {tuple(like.shape[1:])}, got {tuple(w.shape[1:])}")
    return w


def per_step_values(
    name: str,
    value: object,
    n_steps: int,
    channels: int | None,
    like: Tensor,
    *,
    steps_name: str,
    nonnegative: bool = False,
    negative_hint: str = "",
    positive: bool = False,
    deferred: list[Tensor] | None = None,
) -> Tensor:
    """A float or tensor of shape (), (C,) [thresholds], (S,) [steps] or (S, C) -> (S, C) or (S,) in like's dtype
    (broadcast with autograd: a shared value's gradient is the sum over its uses). negative_hint follows the name
    in the message of the sign check alone. ``deferred``: a tensor's value checks are not read here but appended
    there as one flag (``check.value_flags``), for the caller to read with other values' at once."""
    if deferred is not None and isinstance(check.real_or_tensor(name, value), Tensor):
        flag = check.value_flags(check.tensor(name, value), like.dtype, nonnegative=nonnegative, positive=positive)
        if flag is not None:
            deferred.append(flag)
    else:
        value = check.scalar_or_tensor(name, value)
        if nonnegative:
            check.nonnegative(name + negative_hint, value)
        if positive:
            check.positive(name, value, like.dtype)
        check.fits_dtype(name, value, like.dtype, finite=True)
    full = (n_steps,) if channels is None else (n_steps, channels)
    if not isinstance(value, Tensor):
        return torch.full(full, float(value), dtype=like.dtype, device=like.device)
    allowed = (
        {(): "()", (n_steps,): f"({steps_name},)"}
        if channels is None
        else {(): "()", (channels,): f"(C={channels},)", full: f"({steps_name}, C)=({n_steps}, {channels})"}
    )
    if tuple(value.shape) not in allowed:
        raise ValueError(f"{name} must have shape {' or '.join(allowed.values())}, got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device}, but x is on {like.device}")
    return check.broadcast_copy(value.to(like.dtype), full)


def per_layer(name: str, values: object, depth: int, default: object) -> list:
    return check.per_layer(name, values, depth, default)


def ml_ista_arguments(x: Tensor, weights: object, thresholds: object, **options: object) -> dict:
    """Validated canonical arguments of ``functional.ml_ista`` (S = n_iter + 1 steps): a dict of the op's inputs, plus
    ``geometry``: each layer's (signal size, stride, padding).

    Every layer's tensor thresholds and steps are checked with one value read (a host sync on a GPU), and the cached
    default 1/L of every layer with one more, however many layers: the checks that read values are deferred to the
    end of one pass over the layers. Only where a deferred check fails, or another check raises, are the layers
    checked again one by one, reading each value as it comes, so that the error raised is the first one, with its
    message naming the layer and argument, as before; either way before any kernel runs. ``options``: the keywords
    of ``_ml_ista_arguments`` but ``fused``."""
    try:
        out = _ml_ista_arguments(x, weights, thresholds, fused=True, **options)
    except (ValueError, TypeError):
        out = None
    if out is None:  # the first error, raised where the one-by-one checks meet it
        out = _ml_ista_arguments(x, weights, thresholds, fused=False, **options)
    return out


def _ml_ista_arguments(
    x: Tensor,
    weights: object,
    thresholds: object,
    *,
    n_iter: int,
    steps: object,
    strides: object,
    paddings: object,
    encoder_weights: object,
    input_encoder_weights: object,
    z0: object,
    nonneg: bool,
    interleaved: bool,
    default_steps: Callable[[list[tuple[Tensor, tuple, tuple, tuple]]], list[Tensor | float]],
    fused: bool,
) -> dict | None:
    """``ml_ista_arguments``, its value reads deferred and read together where ``fused`` (None where one of those
    checks fails), or one by one."""
    deferred: list[Tensor] | None = [] if fused else None
    pending_defaults: list[tuple[int, Tensor, tuple, tuple, tuple, Tensor]] = []
    n_iter = check.count("n_iter", n_iter, 0)
    rank = spatial_rank(x)
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise TypeError("weights must be a non-empty list of dictionary tensors, one per layer")
    depth, n_steps, steps_name = len(weights), n_iter + 1, "n_iter + 1"
    thresholds = per_layer("thresholds", thresholds, depth, None)
    steps = per_layer("steps", steps, depth, None)
    strides, paddings = per_layer("strides", strides, depth, 1), per_layer("paddings", paddings, depth, 0)
    encoders = per_layer("encoder_weights", encoder_weights, depth, None)
    input_encoders = per_layer("input_encoder_weights", input_encoder_weights, depth, None)
    out = dict(
        weights=[],
        encoder_weights=[],
        input_encoder_weights=[],
        thresholds=[],
        steps=[],
        strides=[],
        paddings=[],
        geometry=[],
    )
    size, channels = tuple(x.shape[2:]), x.shape[1]
    for j in range(depth):
        where = f"weights[{j}]"
        w = dictionary(where, weights[j], rank, n_steps, steps_name)
        if w.shape[2] != channels:
            raise ValueError(
                f"{where} expects {w.shape[2]} input channels, but layer {j} receives {channels} "
                f"({'x' if j == 0 else f'the codes of weights[{j - 1}]'})"
            )
        check.same_device(x=x, **{where: w})
        check.same_dtype(x=x, **{where: w})
        try:
            stride, padding, code = check.geometry(size, w[0], strides[j], paddings[j])
        except (ValueError, TypeError) as err:
            raise type(err)(f"layer {j}: {err}") from None
        e = optional_dictionary(f"encoder_weights[{j}]", encoders[j], w, rank, n_steps, steps_name)
        b = optional_dictionary(f"input_encoder_weights[{j}]", input_encoders[j], w, rank, n_steps, steps_name)
        for name, t in ((f"encoder_weights[{j}]", e), (f"input_encoder_weights[{j}]", b)):
            if t.numel():
                check.same_device(x=x, **{name: t})
                check.same_dtype(x=x, **{name: t})
        if thresholds[j] is None:
            raise ValueError(f"thresholds[{j}] is missing: give a float or a tensor per layer")
        values = check.values_like(x, w, e, b)
        out["thresholds"].append(
            per_step_values(
                f"thresholds[{j}]",
                thresholds[j],
                n_steps,
                w.shape[1],
                values,
                steps_name=steps_name,
                nonnegative=not nonneg,
                negative_hint=" (negative thresholds need nonneg=True)",
                deferred=deferred,
            )
        )
        if steps[j] is None:
            if fused:  # estimated (or their cache compared) for all layers together below
                pending_defaults.append((j, w, size, stride, padding, values))
                step = None
            else:
                step = _default_steps_of(default_steps, w, size, stride, padding, values, n_steps)
        else:
            step = per_step_values(
                f"steps[{j}]",
                steps[j],
                n_steps,
                None,
                values,
                steps_name=steps_name,
                positive=True,
                deferred=deferred,
            )
        out["steps"].append(step)
        for key, value in (("weights", w), ("encoder_weights", e), ("input_encoder_weights", b)):
            out[key].append(value)
        out["strides"] += stride
        out["paddings"] += padding
        out["geometry"].append((size, stride, padding))
        size, channels = code, w.shape[1]
    if z0 is None:
        out["z0"] = x.new_empty(0)
    else:
        if interleaved:
            raise ValueError("z0 (a starting deepest code) needs the projected iteration (interleaved=False)")
        z0 = check.tensor("z0", z0)
        want = (x.shape[0], channels, *size)
        if tuple(z0.shape) != want:
            raise ValueError(f"z0 must have the deepest code's shape {want}, got {tuple(z0.shape)}")
        check.same_device(x=x, z0=z0)
        check.same_dtype(x=x, z0=z0)
        out["z0"] = z0
    if fused:
        if not check.none_true(deferred):
            return None
        requests = [
            (w[k], size, stride, padding)
            for _, w, size, stride, padding, _ in pending_defaults
            for k in range(w.shape[0])
        ]
        one_over_l = iter(default_steps(requests))
        for j, w, *_, values in pending_defaults:
            out["steps"][j] = _stacked_steps([next(one_over_l) for _ in range(w.shape[0])], values, n_steps)
    return out


def _stacked_steps(one_over_l: list, like: Tensor, n_steps: int) -> Tensor:
    """A layer's default steps (S,) from the 1/L of each of its S_w dictionaries."""
    step = torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in one_over_l])
    return step.expand(n_steps).contiguous() if len(one_over_l) == 1 else step


def _default_steps_of(default_steps, w: Tensor, size, stride, padding, like: Tensor, n_steps: int) -> Tensor:
    """One layer's default steps (S,): 1/L of each of its dictionaries w[k]."""
    return _stacked_steps(default_steps([(w[k], size, stride, padding) for k in range(w.shape[0])]), like, n_steps)


def conv_ista_variant_arguments(
    x: object,
    weight: object,
    lam: object,
    *,
    n_iter: object,
    step: object,
    threshold: object,
    encoder_weight: object,
    input_encoder_weight: object,
    stride: object,
    padding: object,
    z0: object,
    nonneg: bool,
    fista: bool,
    recompute: bool,
    default_steps: Callable[[list[tuple[Tensor, tuple, tuple, tuple]]], list[Tensor | float]],
) -> dict:
    """Validated canonical arguments of conv_ista's variants as a one-layer ml_ista op (S = n_iter steps), plus
    ``features``: the table features they need (table.CONV_ISTA_VARIANTS)."""
    n_iter = check.count("n_iter", n_iter, 1)
    for name, value in (("nonneg", nonneg), ("fista", fista), ("recompute", recompute)):
        check.flag(name, value)
    rank = spatial_rank(x)
    per_iteration = any(is_per_step(t, rank) for t in (weight, encoder_weight, input_encoder_weight))
    features = (("per_iteration_weight",) if per_iteration else ()) + (
        ("input_encoder",) if input_encoder_weight is not None else ()
    )
    w = dictionary("weight", weight, rank, n_iter, "n_iter")
    try:
        x = check.signal("x", x, w[0])
    except ValueError as err:
        # the same reading as dictionary()'s hint, where the count happened to equal n_iter: an unbatched image
        # (C, H, W) and a 2-D weight (8, 1, 3, 3) with n_iter=8 were told "x has 16 channels but weight expects
        # C_sig=3"
        if rank == 1 and is_per_step(weight, rank):
            raise ValueError(
                f"{err} (x is 1-D (B, C, L), so weight of shape {tuple(weight.shape)} reads as {weight.shape[0]} "
                "per-step 1-D dictionaries; for a 2-D dictionary x must have rank 4: (B, C, H, W))"
            ) from None
        raise
    check.same_device(x=x, weight=w)
    check.same_dtype(x=x, weight=w)
    e = optional_dictionary("encoder_weight", encoder_weight, w, rank, n_iter, "n_iter")
    b = optional_dictionary("input_encoder_weight", input_encoder_weight, w, rank, n_iter, "n_iter")
    for name, t in (("encoder_weight", e), ("input_encoder_weight", b)):
        if t.numel():
            check.same_device(x=x, **{name: t})
            check.same_dtype(x=x, **{name: t})
    stride, padding, code = check.geometry(x.shape[2:], w[0], stride, padding)
    if z0 is not None:
        z0 = check.tensor("z0", z0)
        if tuple(z0.shape) != (x.shape[0], w.shape[1], *code):
            raise ValueError(f"z0 must have the code's shape {(x.shape[0], w.shape[1], *code)}, got {tuple(z0.shape)}")
        check.same_device(x=x, z0=z0)
        check.same_dtype(x=x, z0=z0)
    values = check.values_like(x, w, e, b)
    if step is None:  # 1/L of each iteration's dictionary
        step = _default_steps_of(default_steps, w, tuple(x.shape[2:]), stride, padding, values, n_iter)
    else:
        step = per_step_values("step", step, n_iter, None, values, steps_name="n_iter", positive=True)
    if (lam is None) == (threshold is None):
        raise ValueError("give exactly one of lam (threshold = step * lam) and threshold (absolute)")
    if lam is not None:
        thresholds = (
            per_step_values("lam", lam, n_iter, w.shape[1], values, steps_name="n_iter", nonnegative=True)
            * step[:, None]
        )
    else:
        thresholds = per_step_values(
            "threshold" if nonneg else "threshold (negative thresholds need nonneg=True)",
            threshold,
            n_iter,
            w.shape[1],
            values,
            steps_name="n_iter",
            nonnegative=not nonneg,
        )
    return dict(
        features=features,
        weights=[w],
        encoder_weights=[e],
        input_encoder_weights=[b],
        thresholds=[thresholds],
        steps=[step],
        z0=x.new_empty(0) if z0 is None else z0,
        strides=stride,
        paddings=padding,
    )
