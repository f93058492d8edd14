"""Ahead-of-time compilation of every conv-ISTA Triton kernel for sm_80 and sm_90, without a GPU.

triton.compile with an explicit GPUTarget needs no driver, and triton's wheel ships ptxas, so this goes all the
way to cubin: compiler-only failures (layouts, dot shapes, shared-memory overflow) fail here rather than on the
first GPU run. It runs in a subprocess because the test session sets TRITON_INTERPRET=1, under which kernels are
not compiled. The kernel list comes from the module's KERNELS registry, which is checked against the module's
contents, so a new kernel cannot be left out.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dsc_kernels.triton import conv_ista as m

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

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

    jit = {n for n, v in vars(m).items() if isinstance(v, triton.runtime.JITFunction) and n.endswith("_kernel")}
    assert jit == set(m.KERNELS), ("kernels missing from KERNELS", jit ^ set(m.KERNELS))
    seen = set()
    for cap, name, fn, sig, constexprs, options in m.aot_specializations():
        c = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", cap, 32), options=options)
        assert len(c.asm["cubin"]) > 0, (cap, name)
        limit = 232448 if cap == 90 else 166912  # opt-in shared memory per block on H100 / A100
        assert c.metadata.shared <= limit, (cap, name, c.metadata.shared)
        seen.add((cap, name))
        print("compiled", cap, name, constexprs["KH"], constexprs["KW"], "shared", c.metadata.shared,
              resources(c.asm["cubin"]), flush=True)
    missing = {(cap, n) for cap in (80, 90) for n in m.KERNELS} - seen
    assert not missing, ("not compiled", missing)
""")


def test_conv_ista_kernels_compile_for_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("compiled ") >= 8, proc.stdout
    print(proc.stdout)
