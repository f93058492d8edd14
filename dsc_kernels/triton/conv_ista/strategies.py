"""Which forward strategy (forward.py's header) a problem runs, and the tap-major reduction threshold: the rule, and
`strategy`, which pins either for a block. Both settings are this module's globals, read at each launch.
"""

import contextlib

# The forward's strategy (forward.py's header): "auto" chooses by the rule in forward_strategy; tests, the tune script
# and the sanitizer cases pin "two-pass", "single-launch" or "tiles" to exercise or time one.
FORWARD_STRATEGY = "auto"
# Reductions run tap-major (see _synth_tile) over a convolution whose reduced channels number at least this: then
# they fill a dot's K of 16 on their own.
TAP_MAJOR_MIN_CHANNELS = 16


def _tap_major(channels: int) -> bool:
    return channels >= TAP_MAJOR_MIN_CHANNELS


# Between the strategies the fused kernels offer when the convolutions are too narrow for two-pass: run every
# iteration in one launch (one program per image) when an image's code is at most this large. Its working set then
# stays in L1/L2 between iterations, and n launches become one; larger codes need the per-iteration grid over
# tiles to fill the GPU. A guess until timed on a GPU: with fewer images than SMs the single launch leaves SMs
# idle, so the best limit also depends on the batch.
SINGLE_LAUNCH_MAX_CODE_BYTES = 256 * 1024


def forward_strategy(C_sig: int, C_code: int, code_bytes: int) -> str:
    """Two GEMM kernels per iteration when both convolutions reduce over enough channels to run tap-major (their
    tiles then need no halo, no slab and no 2-D index arithmetic); otherwise the fused tile kernels, whose
    flattened (channel, tap) reductions keep the tensor cores fed with 1-3 channels. code_bytes: one image's code.
    FORWARD_STRATEGY, when not "auto", decides instead."""
    if FORWARD_STRATEGY != "auto":
        return FORWARD_STRATEGY
    if _tap_major(C_sig) and _tap_major(C_code):
        return "two-pass"
    return "single-launch" if code_bytes <= SINGLE_LAUNCH_MAX_CODE_BYTES else "tiles"


@contextlib.contextmanager
def strategy(forward: str | None = None, tap_major_min_channels: int | None = None):
    """Pin the forward strategy ("two-pass", "single-launch", "tiles" or "auto") and/or the tap-major threshold
    for the launches inside the block (tests, the tune script, the sanitizer cases, the AOT recording)."""
    global FORWARD_STRATEGY, TAP_MAJOR_MIN_CHANNELS
    saved = FORWARD_STRATEGY, TAP_MAJOR_MIN_CHANNELS
    if forward is not None:
        if forward not in ("auto", "two-pass", "single-launch", "tiles"):
            raise ValueError(f"forward strategy must be auto, two-pass, single-launch or tiles, got {forward!r}")
        FORWARD_STRATEGY = forward
    if tap_major_min_channels is not None:
        TAP_MAJOR_MIN_CHANNELS = tap_major_min_channels
    try:
        yield
    finally:
        FORWARD_STRATEGY, TAP_MAJOR_MIN_CHANNELS = saved
