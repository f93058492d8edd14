"""Ahead-of-time compilation of the sparse-attention Triton kernels for sm_80 and sm_90, without a GPU.

Runs in a subprocess: the test session sets TRITON_INTERPRET=1, under which triton.compile is not the real one.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# Each case: (capability, dtype, head dim, mode, causal, kernel, score bias). Together they cover every kernel,
# both architectures, the three dtypes (fp32 with IEEE dots), both modes, padded head dims (24 -> 32) and the
# kernels with and without a bias (masks).
CASES = [
    (80, "bf16", 64, "sparsemax", True, "fwd", False),
    (80, "fp16", 24, "sparsemax", False, "bwd_dq", True),
    (80, "fp32", 128, "shrink", True, "bwd_dkdv", False),
    (90, "fp16", 128, "shrink", False, "fwd", True),
    (90, "bf16", 64, "shrink", True, "bwd_dq", False),
    (90, "bf16", 16, "sparsemax", True, "bwd_dkdv", True),
    (90, "fp32", 64, "sparsemax", False, "fwd", True),
]

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dsc_kernels.triton import sparse_attention as tsa

    for cap, dtype, d, mode, causal, kernel, has_bias in {cases!r}:
        sig, const = tsa.aot_signature(dtype, d, mode, causal, kernel, has_bias)
        c = triton.compile(ASTSource(tsa.KERNELS[kernel], sig, const), target=GPUTarget("cuda", cap, 32))
        assert len(c.asm["cubin"]) > 0, (cap, kernel)
        limit = 232448 if cap == 90 else 166912  # opt-in shared memory per block on H100 / A100
        assert c.metadata.shared <= limit, (cap, kernel, c.metadata.shared)
        print(cap, dtype, d, mode, causal, kernel, has_bias, "shared", c.metadata.shared, flush=True)
""")


def test_sparse_attention_kernels_compile_for_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(cases=CASES)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("shared") == len(CASES)
