"""Ahead-of-time compilation of the conv-ISTA Triton kernels for sm_80 and sm_90, without a GPU.

The specialisations are not written down here: `conv_ista.aot_specializations` records the launches the launchers
really make (block sizes, num_warps, dtypes, flags) on the GPU workloads of docs/design.md §6 (speed.WORKLOADS, GPU
sizes) and a 1-D problem, in fp32 (TF32 and IEEE dots), bf16 and fp16, with and without FISTA/nonneg. triton.compile
with
an explicit GPUTarget needs no driver and triton's wheel ships ptxas, so this goes all the way to cubin:
compiler-only failures (layouts, dot shapes, shared-memory overflow) fail here rather than on the first GPU run.
It runs in a subprocess because the interpreter tests set TRITON_INTERPRET=1, under which nothing is compiled.

The default test compiles a cover of the recorded specialisations (each kernel on both targets, with every
workload geometry, every dtype/precision, every flag combination and every channel tiling it is launched with at
least once); the `slow` test compiles all of them for sm_90.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, re, subprocess, sys, tempfile
    import torch, triton
    from dsc_kernels.experiments.speed import WORKLOADS
    from dsc_kernels.triton import conv_ista as m
    from dsc_kernels.triton.conv_ista import kernels
    from dsc_kernels.triton.launch import aot_compile

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    ALL = sys.argv[1] == "all"

    def resources(cubin):
        # Registers and spill stack per thread: the config table is chosen to keep STACK at 0 (printed, not
        # asserted: the numbers move between triton versions).
        if not os.path.exists(CUOBJDUMP):
            return "?"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        found = re.search(r"REG:\\d+ STACK:\\d+", out)
        return found.group(0) if found else "?"

    problems = [(w.x_gpu, w.w_gpu, (w.stride,) * 2, (w.padding,) * 2) for w in WORKLOADS.values()]
    problems.append(((8, 4, 1, 1000), (32, 4, 1, 9), (1, 1), (0, 4)))  # 1-D, as the op sees it (H = 1)
    # The channel tiles the workloads never pick: 128 signal channels (the synthesis's BLOCK_CI = 128) and at most
    # 16 code channels (BLOCK_C = 16 in the fused forward, the analysis and the weight gradient).
    problems += [((2, 128, 16, 16), (128, 128, 3, 3), (1, 1), (1, 1)), ((2, 2, 16, 16), (8, 2, 3, 3), (1, 1), (1, 1))]
    variants = [(torch.float32, True, False, False), (torch.float32, False, True, False),
                (torch.bfloat16, True, False, True), (torch.float16, True, True, True)]
    specs = {}
    for i, (xs, ws, s, p) in enumerate(problems):
        for j, (dtype, tf32, fista, nonneg) in enumerate(variants):
            for spec in m.aot_specializations(xs, ws, s, p, dtype, fista=fista, nonneg=nonneg, allow_tf32=tf32):
                specs.setdefault(spec.key(), spec)
    names = {spec.name for spec in specs.values()}
    jit = {
        n for n, v in vars(kernels).items() if isinstance(v, triton.runtime.JITFunction) and n.endswith("_kernel")
    }
    assert jit == set(m.KERNELS) == names, ("kernels", jit, set(m.KERNELS), names)

    def features(spec):
        c = spec.constexprs
        geometry = tuple(c[k] for k in ("KH", "KW", "SH", "SW", "PH", "PW"))
        types = tuple(v for v in spec.signature.values() if v.startswith("*")) + (c.get("IN_PREC"),)
        flags = tuple((k, v) for k, v in c.items() if isinstance(v, bool))
        tiles = tuple((k, v) for k, v in c.items() if k.startswith("BLOCK"))
        return {(spec.name, "geometry", geometry), (spec.name, "types", types), (spec.name, "flags", flags),
                (spec.name, "tiles", tiles)}

    # Greedy set cover: each pick adds the most features not yet covered.
    chosen, covered, pool = [], set(), list(specs.values())
    while pool:
        best = max(pool, key=lambda spec: len(features(spec) - covered))
        if not ALL and not features(best) - covered:
            break
        pool.remove(best)
        chosen.append(best)
        covered |= features(best)
    print("recorded", len(specs), "specialisations; compiling", len(chosen), flush=True)
    seen, picks = set(), {}
    for spec in chosen:
        picks[spec.name] = picks.get(spec.name, -1) + 1
        for cap in [90] if ALL else [90 if picks[spec.name] % 2 == 0 else 80]:  # each kernel on both targets
            c = aot_compile(spec, cap)
            assert len(c.asm["cubin"]) > 0, (cap, spec.name)
            limit = 232448 if cap == 90 else 166912  # opt-in shared memory per block on H100 / A100
            assert c.metadata.shared <= limit, (cap, spec.name, c.metadata.shared)
            seen.add((cap, spec.name))
            shown = {k: v for k, v in spec.constexprs.items() if k in ("KH", "KW", "SH", "IN_PREC", "FISTA")}
            pointers = sorted({t for t in spec.signature.values() if t.startswith("*")})
            print("compiled", cap, spec.name, shown, pointers, "shared", c.metadata.shared,
                  resources(c.asm["cubin"]), flush=True)
    missing = {(cap, n) for cap in ((90,) if ALL else (80, 90)) for n in m.KERNELS} - seen
    assert not missing, ("not compiled", missing)
""")


def _compile(which: str, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, which], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.child_process
def test_conv_ista_kernels_compile_for_sm80_sm90():
    out = _compile("cover", 900)
    assert out.count("compiled ") >= 10, out
    print(out)


@pytest.mark.slow
@pytest.mark.exhaustive  # 468 compilations: about 7 minutes on 2 cores with a cold Triton cache
def test_every_recorded_specialisation_compiles_for_sm90():
    out = _compile("all", 3600)
    print(out)
