"""Window-scope NLRN inference streamed as a wavefront of row bands through all steps (same result as forward).

Step t+1 of the rows [a, a+8) needs step t only down to row a+8+r+2 (window radius r, then two 3x3
convs), so all steps run as a pipeline in bands of 8 rows, each band computed at the latest moment a
later step asks for it. The carried logits (P = q^2 floats a pixel, the bulk of the memory) then
exist only for the (T-1)(r+2) rows (rounded up to bands) between the first and the last step's front
instead of the whole image, and the other features for a few bands each. The image is transposed
(with the 3x3 kernels) so that the bands run along its longer side.

Each stage computes one piece of ``NLRNStep`` (``nlrn_arch``) for a range of rows and keeps its
output rows while a later stage may read them. Stages point only to the stages they read (no
cycles), so every buffer is freed as soon as the forward returns.

Under ``torch.autocast`` the kept feature rows are in the autocast dtype (half the memory in bf16) and the
carried logits stay fp32 (``nl_plugin.ops.nlrn_attention.common``).
"""
import functools

import torch
from torch.nn import functional as F

from nl_plugin.ops.amp import compute_dtype
from nl_plugin.ops.nlrn_attention import window_attention_rows
from nl_plugin.ops.nlrn_attention.common import border_rule, window_geometry
from nl_plugin.ops.nlrn_attention.router import Kernel, band_kernel
from nl_plugin.ops.nlrn_attention.triton_window import triton_window_rows

# Bands of this many rows (one query-block row of the banded attention op; smaller bands keep fewer
# carried logits alive).
_BAND = 8
# Bands of the fused Triton step (GPU): its image-layout logits take any band height, and taller bands mean fewer
# launches; (T-1)(r+2) rows plus a band per step stay alive (about 11 GB of fp32 logits at q = 45 across 2160
# columns).
_TRITON_BAND = 32
# Features are channels-last (NHWC in memory): oneDNN's 3x3 convs are faster on it, and the
# non-local embeddings and attention output are NHWC views of the same memory.
_CL = torch.channels_last


class _Context:
    """What every stage shares: the (transposed) input, the output, row convs and the carried logits."""

    def __init__(self, net, x):
        self.net = net
        self.transpose = x.shape[3] > x.shape[2]
        self.x = x.transpose(2, 3).contiguous() if self.transpose else x
        self.h = self.x.shape[2]
        blk = net.nonlocal_blocks[0]
        self.geo = window_geometry(self.h, self.x.shape[3], blk.window_size, blk.border)
        self.py = self.geo.py
        #: the attention of a band runs on the fused Triton step (else the strips kernel)
        self.triton = band_kernel(blk.attention_kernel, x.device) is Kernel.TRITON and border_rule(blk.border).streams
        self.band = _TRITON_BAND if self.triton else _BAND
        self.out = torch.empty_like(self.x)
        # (conv, dtype) -> weights in the dtype the row convs run in (the autocast dtype, fp32 for the head):
        # cast once, not again for every band
        self.weights = {}
        self.logits = {}     # (non-local step index, first row of the band) -> carried logits of that band

    def conv_rows(self, conv, inp, lo, a, e):
        """Rows [a, e) of a 3x3 conv (zero padding) of ``inp``, which holds rows lo.. of its input."""
        h = self.h
        t = inp[:, :, max(a - 1, 0) - lo:min(e + 1, h) - lo]
        if a == 0 or e == h:
            t = F.pad(t, (0, 0, int(a == 0), int(e == h))).contiguous(memory_format=_CL)
        dtype = compute_dtype(t)        # the autocast dtype; fp32 for the head's full-precision conv
        if (conv, dtype) not in self.weights:
            w = conv.weight.transpose(2, 3) if self.transpose else conv.weight
            self.weights[conv, dtype] = w.to(dtype).contiguous(memory_format=_CL)
        return F.conv2d(t, self.weights[conv, dtype], conv.bias, padding=(0, 1))

    def row_conv(self, lo, a, e):
        """``ConvFn`` giving rows [a, e) from an input holding rows lo.."""
        return functools.partial(self.conv_rows, lo=lo, a=a, e=e)

    def s0_rows(self, a, e):
        lo = max(a - 1, 0)
        s0 = self.net.stem(self.x[:, :, lo:min(e + 1, self.h)], self.row_conv(lo, a, e))
        return s0.contiguous(memory_format=_CL)     # a 1-channel input gives no layout to follow

    def result(self):
        return self.out.transpose(2, 3).contiguous() if self.transpose else self.out


class _Stem:
    """s0, recomputed from the input rows whenever a stage reads it (not stored)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def rows(self, a, e):
        return [self.ctx.s0_rows(a, e)]


class _Stage:
    """A row-streamed computation and its output rows [lo, front).

    The rows live in buffers used as a sliding window: appended rows are written after the kept
    ones and the buffers are only reallocated (kept rows copied) when full or far too large, so a
    band costs no copy of the rows kept for the readers' halo.

    Args:
        ctx (_Context): Shared state.
        reads (list[tuple]): (source, rows needed beyond the computed ones) pairs; a source is a
            ``_Stage`` or the ``_Stem``.
    """
    band = None       # compute whole bands of this many rows
    dims = (2, )      # row dimension of each output part

    def __init__(self, ctx, reads):
        self.ctx = ctx
        self.inputs = [(src, need) for src, need in reads if isinstance(src, _Stage)]   # to schedule
        self.lo = self.front = 0
        self.bufs, self.off, self.cap = None, 0, 0     # buffers, buffer row of ``lo``, buffer rows

    def compute(self, a, e):
        """Output parts of rows [a, e) (a tuple of tensors), or None when written elsewhere."""
        raise NotImplementedError

    def _realloc(self, parts, keep, extra):
        self.cap = keep + extra + 2 * _BAND
        new = []
        for p, dim in zip(parts, self.dims):
            shape = list(p.shape)
            shape[dim] = self.cap
            fmt = torch.channels_last if p.dim() == 4 and not p.is_contiguous() else torch.contiguous_format
            new.append(torch.empty(shape, dtype=p.dtype, device=p.device, memory_format=fmt))
            if keep:
                new[-1].narrow(dim, 0, keep).copy_(self.bufs[len(new) - 1].narrow(dim, self.off, keep))
        self.bufs, self.off = new, 0

    def append(self, parts, end):
        if parts is not None:
            n, keep = end - self.front, self.front - self.lo
            if self.bufs is None or self.off + keep + n > self.cap:
                self._realloc(parts, keep, n)
            for buf, p, dim in zip(self.bufs, parts, self.dims):
                buf.narrow(dim, self.off + keep, n).copy_(p)
        self.front = end

    def rows(self, a, e):
        return [b.narrow(dim, self.off + a - self.lo, e - a) for b, dim in zip(self.bufs, self.dims)]

    def drop_before(self, a):
        a = min(a, self.front)
        if a > self.lo:
            self.off += a - self.lo
            self.lo = a
            keep = self.front - a
            if self.bufs is not None and self.cap > 2 * (keep + 4 * _BAND):    # shrink after the first rows
                self._realloc(self.bufs, keep, 0)


class _Features(_Stage):
    """z = features(s) of a step without the non-local module."""

    def __init__(self, ctx, src, step):
        super().__init__(ctx, [(src, 0)])
        self.src, self.step = src, step

    def compute(self, a, e):
        return (self.step.features(self.src.rows(a, e)[0], inplace=True), )


class _KeysValues(_Features):
    """Keys and values of the non-local module, kept over the window's reach (queries: ``_Attend``)."""
    dims = (1, 1)

    def compute(self, a, e):
        z = self.step.features(self.src.rows(a, e)[0], inplace=True)
        return self.step.block.embed(z.permute(0, 2, 3, 1), query=False)


class _Attend(_Stage):
    """z + A g for a band of rows, with the band's carried logits (``window_attention_rows``)."""
    band = _BAND

    def __init__(self, ctx, src, kv, step, index, carry_in, carry_out):
        super().__init__(ctx, [(kv, ctx.py), (src, 0)])
        self.band = ctx.band
        self.src, self.kv, self.step = src, kv, step
        self.index, self.carry_in, self.carry_out = index, carry_in, carry_out

    def compute(self, a, e):
        ctx, blk = self.ctx, self.step.block
        lo, hi = max(a - ctx.py, 0), min(e + ctx.py, ctx.h)
        k, v = self.kv.rows(lo, hi)
        z = self.step.features(self.src.rows(a, e)[0], inplace=True)
        q = blk.embed(z.permute(0, 2, 3, 1), key_value=False)[0]
        prev = ctx.logits.pop((self.index - 1, a), None) if self.carry_in else None
        if ctx.triton:
            res = triton_window_rows(q, k, v, a - lo, ctx.geo, blk.normalization, prev_logits=prev,
                                     return_logits=self.carry_out)
        else:
            res = window_attention_rows(q, k, v, a - lo, blk.window_size, blk.normalization, prev_logits=prev,
                                        return_logits=self.carry_out, image_height=ctx.h, border=blk.border)
        if self.carry_out:
            res, ctx.logits[(self.index, a)] = res
        return (self.step.add_attention(z, res.permute(0, 3, 1, 2), inplace=True), )


class _Hidden(_Stage):
    """h = hidden(z) (conv_a)."""

    def __init__(self, ctx, z, step):
        super().__init__(ctx, [(z, 1)])
        self.z, self.step = z, step

    def compute(self, a, e):
        lo = max(a - 1, 0)
        return (self.step.hidden(self.z.rows(lo, min(e + 1, self.ctx.h))[0], self.ctx.row_conv(lo, a, e)), )


class _NextState(_Stage):
    """s = next_state(h, s0) (conv_b and the identity path from s0)."""

    def __init__(self, ctx, hid, step):
        super().__init__(ctx, [(hid, 1)])
        self.hid, self.step = hid, step

    def compute(self, a, e):
        ctx, lo = self.ctx, max(a - 1, 0)
        h = self.hid.rows(lo, min(e + 1, ctx.h))[0]
        return (self.step.next_state(h, ctx.s0_rows(a, e), ctx.row_conv(lo, a, e), inplace=True), )


class _Head(_Stage):
    """Output rows x + conv_end(ReLU(BN_out(s))), written into the output image."""

    def __init__(self, ctx, src):
        super().__init__(ctx, [(src, 1)])
        self.src = src

    def compute(self, a, e):
        ctx, lo = self.ctx, max(a - 1, 0)
        s = self.src.rows(lo, min(e + 1, ctx.h))[0]
        ctx.out[:, :, a:e] = ctx.net.head(ctx.x[:, :, a:e], s, ctx.row_conv(lo, a, e))


def _build_stages(ctx, net):
    """The stages of every step in order, the head last."""
    stages, src = [], _Stem(ctx)
    steps = net.steps()
    n_nl = sum(step.block is not None for step in steps)
    k_nl, propagate = 0, net.propagate_correlation
    for step in steps:
        if step.block is not None:
            kv = _KeysValues(ctx, src, step)
            z = _Attend(ctx, src, kv, step, k_nl, propagate and k_nl > 0, propagate and k_nl < n_nl - 1)
            stages += [kv, z]
            k_nl += 1
        else:
            z = _Features(ctx, src, step)
            stages.append(z)
        hid = _Hidden(ctx, z, step)
        src = _NextState(ctx, hid, step)
        stages += [hid, src]
    stages.append(_Head(ctx, src))
    return stages


def _ensure(st, e, h, readers):
    """Compute ``st`` down to row e (whole bands), its inputs first; drop rows no reader needs any more."""
    e = min(e, h)
    if st.band:
        e = min(h, -(-e // st.band) * st.band)
    if st.front >= e:
        return
    for src, need in st.inputs:
        _ensure(src, e + need, h, readers)
    while st.front < e:
        b = min(st.front + (st.band or 4 * _BAND), e)
        st.append(st.compute(st.front, b), b)
    for src, _ in st.inputs:
        src.drop_before(min(r.front - need for r, need in readers[src]))


@torch.no_grad()
def stream_forward(net, x: torch.Tensor) -> torch.Tensor:
    """Window-scope inference of ``net`` (an ``NLRN`` in eval mode, a border in ``STREAM_BORDERS``) as a wavefront.

    Args:
        net (NLRN): The network.
        x (Tensor): (B, num_in_ch, H, W) at the network's ``img_range`` scale.

    Returns:
        Tensor: (B, num_in_ch, H, W), the same as ``net.forward`` on the whole image.
    """
    ctx = _Context(net, x)
    stages = _build_stages(ctx, net)
    readers = {}
    for st in stages:
        for src, need in st.inputs:
            readers.setdefault(src, []).append((st, need))
    for e in range(ctx.band, ctx.h + ctx.band, ctx.band):
        _ensure(stages[-1], e, ctx.h, readers)
    return ctx.result()
