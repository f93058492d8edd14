"""Random multi-layer pursuit problems shared by the ML-ISTA tests, and a runner for any backend row."""

from __future__ import annotations

from dataclasses import replace

import torch

import dsc_kernels.functional as DF
from dsc_kernels import _ml_ista_args as ml_args
from dsc_kernels.ops import ml_ista as ml_ista_ops
from dsc_kernels.ops import table

# name: x shape, layers [(C_out, kernel, stride, padding)], options. Options: n_iter, fista, nonneg, interleaved,
# per_step (layers whose dictionaries are per step), encoder / input_encoder (layers with one), z0, thresholds
# ("layer" scalar, "channel" (C,), "step" (S, C)), negative (some negative thresholds; nonneg only), grads (the
# layers whose codes reach the loss; default all).
CASES = {
    "one-layer": ((2, 2, 9, 8), [(3, 3, 1, 1)], dict(n_iter=3)),
    "two-layer-stride2-odd": (
        (2, 1, 13, 11),
        [(4, (4, 3), 2, 1), (5, 3, (1, 2), (1, 0))],
        dict(n_iter=3, thresholds="channel", negative=True),
    ),
    "mnist-like-fista": (
        (2, 1, 16, 16),
        [(3, 4, 2, 0), (4, 3, 2, 0), (6, 3, 1, 0)],
        dict(n_iter=4, fista=True, thresholds="channel", negative=True),
    ),
    "signed-step-thresholds": (
        (2, 2, 10, 9),
        [(3, 3, 1, 1), (4, 3, 2, 1)],
        dict(n_iter=3, nonneg=False, thresholds="step"),
    ),
    "untied-encoders": ((2, 2, 11, 10), [(3, 3, 2, 1), (4, 3, 1, 1)], dict(n_iter=3, encoder=(0, 1), fista=True)),
    "ml-lista": ((2, 1, 12, 12), [(3, 4, 2, 1), (4, 3, 1, 0)], dict(n_iter=3, input_encoder=(0, 1))),
    "mixed-encoders": (
        (2, 2, 10, 11),
        [(3, 3, 1, 1), (4, 3, 2, 0), (3, 2, 1, 0)],
        dict(n_iter=2, encoder=(1,), input_encoder=(2,), nonneg=False),
    ),
    "per-step": (
        (2, 1, 12, 10),
        [(3, 3, 2, 1), (4, 3, 1, 1)],
        dict(n_iter=3, per_step=(0, 1), encoder=(1,), thresholds="step"),
    ),
    "all-free-interleaved": (
        (2, 1, 12, 12),
        [(3, 4, 2, 0), (4, 3, 1, 0)],
        dict(n_iter=3, per_step=(0, 1), encoder=(0, 1), interleaved=True, thresholds="step", negative=True),
    ),
    "interleaved-fista": ((2, 2, 9, 9), [(3, 3, 1, 1), (3, 3, 2, 1)], dict(n_iter=3, interleaved=True, fista=True)),
    "z0-fista": ((2, 2, 10, 10), [(3, 3, 1, 1), (4, 3, 2, 1)], dict(n_iter=3, z0=True, fista=True)),
    "deepest-grad-only": ((3, 1, 11, 11), [(3, 3, 2, 1), (4, 3, 1, 1)], dict(n_iter=2, grads=(1,))),
    "cnn-only": ((2, 1, 9, 9), [(3, 3, 1, 1), (4, 3, 2, 0)], dict(n_iter=0)),
    "1d-two-layer": ((2, 2, 23), [(3, 5, 2, 2), (4, 3, 1, 1)], dict(n_iter=3, fista=True, input_encoder=(1,))),
}


def _as_pair(v, rank):
    return (v,) * rank if isinstance(v, int) else tuple(v)


def make_problem(name: str, dtype=torch.float64, seed: int = 0) -> dict:
    """Leaf tensors and options of a case, as ``DF.ml_ista`` takes them."""
    xs, layers, opts = CASES[name]
    g = torch.Generator().manual_seed(seed)
    rank = len(xs) - 2
    n_steps = opts["n_iter"] + 1
    nonneg = opts.get("nonneg", True)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(*xs)
    weights, encoders, input_encoders, thresholds, steps, strides, paddings = [], [], [], [], [], [], []
    c_in = xs[1]
    for j, (c_out, k, s, p) in enumerate(layers):
        shape = (c_out, c_in, *_as_pair(k, rank))
        lead = (n_steps,) if j in opts.get("per_step", ()) else ()
        scale = 0.9 / (c_in * torch.tensor(shape[2:]).prod().item()) ** 0.5
        weights.append(rnd(*lead, *shape, scale=scale))
        encoders.append(rnd(*lead, *shape, scale=scale) if j in opts.get("encoder", ()) else None)
        input_encoders.append(rnd(*lead, *shape, scale=scale) if j in opts.get("input_encoder", ()) else None)
        kind = opts.get("thresholds", "layer")
        t_shape = {"layer": (), "channel": (c_out,), "step": (n_steps, c_out)}[kind]
        t = rnd(*t_shape, scale=0.1).abs() + 0.02
        if opts.get("negative") and nonneg:
            t = t - 0.08  # some negative thresholds: ReLU(u + |t|)
        thresholds.append(t)
        steps.append((0.5 + torch.rand(n_steps, generator=g, dtype=torch.float64)).to(dtype))
        strides.append(s)
        paddings.append(p)
        c_in = c_out
    problem = dict(
        x=x,
        weights=weights,
        thresholds=thresholds,
        steps=steps,
        strides=strides,
        paddings=paddings,
        encoder_weights=encoders,
        input_encoder_weights=input_encoders,
        n_iter=opts["n_iter"],
        fista=opts.get("fista", False),
        nonneg=nonneg,
        interleaved=opts.get("interleaved", False),
    )
    if opts.get("z0"):
        sizes = [xs[2:]]
        for _, k, s, p in layers:
            sizes.append(
                tuple(
                    (n + 2 * pp - kk) // ss + 1
                    for n, kk, ss, pp in zip(sizes[-1], _as_pair(k, rank), _as_pair(s, rank), _as_pair(p, rank))
                )
            )
        problem["z0"] = rnd(xs[0], layers[-1][0], *sizes[-1], scale=0.3).abs()
    problem["grads"] = opts.get("grads", tuple(range(len(layers))))
    return problem


TENSOR_KEYS = ("x", "weights", "thresholds", "steps", "encoder_weights", "input_encoder_weights", "z0")


def leaves(problem: dict) -> dict:
    """Fresh leaf copies (requires_grad) of the problem's tensors, keeping None entries."""

    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_()

    out = dict(problem)
    for key in TENSOR_KEYS:
        if key not in problem:
            continue
        value = problem[key]
        out[key] = [leaf(t) for t in value] if isinstance(value, list) else leaf(value)
    return out


def flat_leaves(problem: dict) -> list[tuple[str, torch.Tensor]]:
    named = []
    for key in TENSOR_KEYS:
        value = problem.get(key)
        if isinstance(value, list):
            named += [(f"{key}[{j}]", t) for j, t in enumerate(value) if t is not None]
        elif value is not None:
            named.append((key, value))
    return named


def op_arguments(problem: dict, **overrides) -> dict:
    """functional's argument normalisation (_ml_ista_args.ml_ista_arguments) of ``problem``, no default step;
    ``overrides`` replace the problem's z0 / interleaved."""
    p = {"z0": problem.get("z0"), "interleaved": problem["interleaved"], **overrides}
    return ml_args.ml_ista_arguments(
        problem["x"],
        problem["weights"],
        problem["thresholds"],
        n_iter=problem["n_iter"],
        steps=problem["steps"],
        strides=problem["strides"],
        paddings=problem["paddings"],
        encoder_weights=problem["encoder_weights"],
        input_encoder_weights=problem["input_encoder_weights"],
        z0=p["z0"],
        nonneg=problem["nonneg"],
        interleaved=p["interleaved"],
        default_steps=None,
    )


def run_row(problem: dict, backend: str, *, hand_written_vjp: bool = True, recompute: bool = False):
    """The codes of ``problem`` on ``backend``'s ml_ista row; for the reference, ``hand_written_vjp`` runs its op pair
    (ml_ista_fwd_ref / ml_ista_bwd_ref) instead of autograd through the eager oracle."""
    p = problem
    args = op_arguments(p)
    row = table.row("ml_ista", backend)
    if hand_written_vjp and row.eager is not None:
        row = replace(row, eager=None)
    return ml_ista_ops.run(
        row,
        p["x"],
        args["weights"],
        args["encoder_weights"],
        args["input_encoder_weights"],
        args["thresholds"],
        args["steps"],
        args["z0"],
        args["strides"],
        args["paddings"],
        p["nonneg"],
        p["fista"],
        not p["interleaved"],
        recompute,
    )


def run_functional(problem: dict, backend: str, **extra):
    p = problem
    return DF.ml_ista(
        p["x"],
        p["weights"],
        p["thresholds"],
        n_iter=p["n_iter"],
        steps=p["steps"],
        strides=p["strides"],
        paddings=p["paddings"],
        fista=p["fista"],
        nonneg=p["nonneg"],
        backend=backend,
        encoder_weights=p["encoder_weights"],
        input_encoder_weights=p["input_encoder_weights"],
        z0=p.get("z0"),
        interleaved=p["interleaved"],
        **extra,
    )


def codes_and_grads(fn, problem: dict, seed: int = 1):
    """fn(leaves) -> codes; returns (codes, {name: grad}) of sum_j <G_j, R_j> over the layers in problem["grads"]."""
    p = leaves(problem)
    codes = fn(p)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (codes[j] * torch.randn(codes[j].shape, generator=g, dtype=torch.float64).to(codes[j].dtype)).sum()
        for j in problem["grads"]
    )
    named = flat_leaves(p)
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    return [c.detach() for c in codes], {n: gr for (n, _), gr in zip(named, grads)}
