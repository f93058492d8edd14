"""Property tests: the functional API against a direct loop implementation, over random shapes and geometry."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsc_kernels.functional as DF


def loop_analysis(x, w, stride, padding):
    """D^T x by explicit sums over the kernel window: z[b, c, i, j] = sum w[c, s, u, v] x_pad[b, s, i*st+u, j*st+v]."""
    (sh, sw), (ph, pw) = stride, padding
    kh, kw = w.shape[2:]
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    hz, wz = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    z = x.new_zeros(x.shape[0], w.shape[0], hz, wz)
    for i in range(hz):
        for j in range(wz):
            patch = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            z[:, :, i, j] = torch.einsum("bsuv,csuv->bc", patch, w)
    return z


def loop_synthesis(z, w, size, stride, padding):
    """D z by scattering each code's atom into the padded signal, then cropping the padding."""
    (sh, sw), (ph, pw) = stride, padding
    kh, kw = w.shape[2:]
    out = z.new_zeros(z.shape[0], w.shape[1], size[0] + 2 * ph + kh, size[1] + 2 * pw + kw)
    for i in range(z.shape[2]):
        for j in range(z.shape[3]):
            out[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] += torch.einsum("bc,csuv->bsuv", z[:, :, i, j], w)
    return out[:, :, ph : ph + size[0], pw : pw + size[1]]


geometry = st.fixed_dictionaries(
    dict(
        b=st.integers(1, 2),
        c_sig=st.integers(1, 3),
        c_code=st.integers(1, 4),
        h=st.integers(1, 9),
        w=st.integers(3, 10),
        kh=st.integers(1, 4),
        kw=st.integers(1, 4),
        sh=st.integers(1, 3),
        sw=st.integers(1, 3),
        ph=st.integers(0, 2),
        pw=st.integers(0, 2),
        one_d=st.booleans(),
    )
)


def build(g):
    h = 1 if g["one_d"] else max(g["h"], g["kh"])
    kh = 1 if g["one_d"] else g["kh"]
    ph, sh = (0, 1) if g["one_d"] else (min(g["ph"], kh - 1), g["sh"])
    pw = min(g["pw"], g["kw"] - 1)
    width = max(g["w"], g["kw"])
    x = torch.randn(g["b"], g["c_sig"], h, width, dtype=torch.float64)
    w = torch.randn(g["c_code"], g["c_sig"], kh, g["kw"], dtype=torch.float64)
    return x, w, (sh, g["sw"]), (ph, pw)


def squeeze_1d(g, *tensors):
    return [t.squeeze(2) for t in tensors] if g["one_d"] else list(tensors)


@settings(max_examples=40, deadline=None)
@given(geometry)
def test_analysis_and_synthesis_match_loops(g):
    x, w, stride, padding = build(g)
    xs, ws = squeeze_1d(g, x, w)
    s, p = (stride[1], padding[1]) if g["one_d"] else (stride, padding)
    z = DF.conv_analysis(xs, ws, stride=s, padding=p)
    (z_loop,) = squeeze_1d(g, loop_analysis(x, w, stride, padding))
    torch.testing.assert_close(z, z_loop)
    zr = torch.randn_like(z)
    zr4 = zr.unsqueeze(2) if g["one_d"] else zr
    (x_loop,) = squeeze_1d(g, loop_synthesis(zr4, w, x.shape[2:], stride, padding))
    torch.testing.assert_close(DF.conv_synthesis(zr, ws, stride=s, padding=p, signal_size=xs.shape[2:]), x_loop)


@settings(max_examples=25, deadline=None)
@given(geometry, st.booleans(), st.booleans(), st.integers(1, 3))
def test_conv_ista_matches_a_loop_implementation(g, nonneg, fista, n_iter):
    x, w, stride, padding = build(g)
    lam, step = 0.3, 0.05
    # The loop version of docs/design.md §2's recurrence, independent of the package's conv helpers.
    z_prev = z = loop_analysis(x, w, stride, padding) * 0
    t = 1.0
    t_prev = 1.0
    for k in range(n_iter):
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = z + ((t_prev - 1) / t) * (z - z_prev) if fista and k > 0 else z
        u = y + step * loop_analysis(x - loop_synthesis(y, w, x.shape[2:], stride, padding), w, stride, padding)
        z_prev, z = z, (torch.relu(u - step * lam) if nonneg else torch.sign(u) * torch.relu(u.abs() - step * lam))
        t_prev, t = t, t_next
    xs, ws = squeeze_1d(g, x, w)
    s, p = (stride[1], padding[1]) if g["one_d"] else (stride, padding)
    got = DF.conv_ista(
        xs, ws, lam, n_iter=n_iter, step=step, stride=s, padding=p, nonneg=nonneg, fista=fista, backend="reference"
    )
    (expected,) = squeeze_1d(g, z)
    torch.testing.assert_close(got, expected)
