"""NLRN: Non-Local Recurrent Network (Liu, Wen, Fan, Loy, Huang, NeurIPS 2018)."""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from nl_plugin.archs.nlrn_layout import attach_range_marker
from nl_plugin.archs.windowed_nonlocal_arch import WindowedNonLocalBlock
from nl_plugin.ops.windowed_attention import window_attention_rows

# Window-scope inference streams the image in bands of this many rows (one query-block row of the
# attention op; smaller bands keep fewer carried logits alive, see ``_forward_window_stream``).
_BAND = 8


@ARCH_REGISTRY.register()
class NLRN(nn.Module):
    """Non-Local Recurrent Network for denoising and (bicubic-upsampled, Y channel) super-resolution.

    Official graph (paper Fig. 2, eq. 7): ``s0 = conv(BN(x))``; for t = 1..T:
    ``z = NL(ReLU(BN_t1(s)))``, ``s = conv_b(ReLU(BN_t3(conv_a(BN_t2(z))))) + s0``;
    ``out = x + conv_end(ReLU(BN_out(s)))``. Convs and the non-local module are shared across steps,
    every step has its own three BatchNorms (eps 1e-3, momentum 0.01 = TF 0.99). The default
    network has 330,625 parameters outside BatchNorm (340,099 trainable in all).

    Tensors are in [0, 1]. Inside, the input is multiplied by ``img_range`` and the output divided by
    it (BasicSR's EDSR convention), so that the parameters, the BN epsilons, the loss gradients and
    their clipping are at the official 0..255 scale: trained from scratch, the network starts and
    moves as the official one. For SR feed the bicubic-upsampled Y channel (``num_in_ch=1``); the
    network is the same.

    Args:
        num_in_ch (int): Input channels. Default: 1.
        num_out_ch (int): Output channels; must equal ``num_in_ch`` (residual output). Default: 1.
        num_feat (int): Feature channels. Default: 128.
        num_embed (int): theta/phi channels of the non-local module. Default: 64.
        num_steps (int): Recurrent steps T. Default: 12.
        nl_scope (str): 'patch' (attention over the whole input tensor, official) or 'window'
            (q x q window around every pixel over the whole image, paper). Default: 'patch'.
        window_size (int | None): Odd q of the window scope; None or 0 = whole image. Default: 45.
        border (str): Window scope border: 'exclude' or 'circular'. Default: 'exclude'.
        correlation (str): Paper Table 1 correlation function, see
            ``WindowedNonLocalBlock``. Default: 'embedded_gaussian'.
        share_weights (bool): Share convs and non-local weights across steps (official). Default: True.
        nonlocal_every (int): Apply the non-local module at steps 1, 1+k, 1+2k, ... Default: 1.
        propagate_correlation (bool): Carry the correlation across steps (eq. 6). Default: True.
        bn_eps (float): BatchNorm epsilon. Default: 1e-3.
        bn_momentum (float): BatchNorm momentum (PyTorch convention). Default: 0.01.
        img_range (float): Pixel range the network works at inside (official: 255). Saved with the
            weights; a state dict of another range is converted on load (``nlrn_layout``). Default: 255.
    """

    def __init__(self, num_in_ch=1, num_out_ch=1, num_feat=128, num_embed=64, num_steps=12, nl_scope='patch',
                 window_size=45, border='exclude', correlation='embedded_gaussian', share_weights=True,
                 nonlocal_every=1, propagate_correlation=True, bn_eps=1e-3, bn_momentum=0.01, img_range=255.0):
        super().__init__()
        if not float(img_range) > 0:
            raise ValueError(f'img_range must be > 0, got {img_range!r}')
        if num_out_ch != num_in_ch:
            raise ValueError(f'NLRN predicts a residual: num_out_ch ({num_out_ch}) must equal num_in_ch ({num_in_ch})')
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f'num_steps must be a positive int, got {num_steps!r}')
        if not isinstance(nonlocal_every, int) or nonlocal_every < 1:
            raise ValueError(f'nonlocal_every must be a positive int, got {nonlocal_every!r}')
        self.num_in_ch, self.num_steps, self.nonlocal_every = num_in_ch, num_steps, nonlocal_every
        self.propagate_correlation = propagate_correlation
        self.img_range = float(img_range)
        self.nl_steps = [t for t in range(num_steps) if t % nonlocal_every == 0]

        def bn(c):
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)

        def conv3(cin, cout):
            return nn.Conv2d(cin, cout, 3, 1, 1)

        self.bn_first = bn(num_in_ch)
        self.conv_first = conv3(num_in_ch, num_feat)
        n_conv = 1 if share_weights else num_steps
        n_nl = 1 if share_weights else len(self.nl_steps)
        self.nonlocal_blocks = nn.ModuleList(
            WindowedNonLocalBlock(num_feat, num_embed, correlation, nl_scope, window_size, border) for _ in range(n_nl))
        self.convs_a = nn.ModuleList(conv3(num_feat, num_feat) for _ in range(n_conv))
        self.convs_b = nn.ModuleList(conv3(num_feat, num_feat) for _ in range(n_conv))
        # Per-step BatchNorms (not shared): BN_t1 before ReLU/NL, BN_t2 before conv_a, BN_t3 before conv_b.
        self.bns = nn.ModuleList(nn.ModuleList(bn(num_feat) for _ in range(3)) for _ in range(num_steps))
        self.bn_last = bn(num_feat)
        self.conv_last = conv3(num_feat, num_out_ch)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not any(m is b.g for b in self.nonlocal_blocks):
                if not any(m is b.theta or m is b.phi for b in self.nonlocal_blocks):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        attach_range_marker(self, self.img_range)

    def forward(self, x):
        """Args:
            x (Tensor): (B, num_in_ch, H, W) degraded image in [0, 1].

        Returns:
            Tensor: (B, num_in_ch, H, W) restored image ``x + residual``.
        """
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f'NLRN expects input of shape (B, {self.num_in_ch}, H, W), got {tuple(x.shape)}')
        x = x * self.img_range      # official pixel scale inside; every path below works on it
        lean = not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        if lean and self._can_stream(x):
            return self._forward_window_stream(x) / self.img_range
        s0 = self.conv_first(self.bn_first(x))
        s, state = s0, None
        for t in range(self.num_steps):
            bn1, bn2, bn3 = self.bns[t]
            z = F.relu_(bn1(s)) if lean else F.relu(bn1(s))
            del s
            if t in self.nl_steps:
                block = self.nonlocal_blocks[0 if len(self.nonlocal_blocks) == 1 else self.nl_steps.index(t)]
                prev = state if self.propagate_correlation else None
                attn, state = block.attend(z, prev, propagate=self.propagate_correlation)
                z = z.add_(attn) if lean else z + attn      # z + A g (eq. 3)
                del attn
            i = 0 if len(self.convs_a) == 1 else t
            h = self.convs_a[i](bn2(z))                     # no ReLU between BN_t2 and conv_a (official)
            del z
            h = self.convs_b[i](F.relu_(bn3(h)) if lean else F.relu(bn3(h)))
            s = h.add_(s0) if lean else h + s0             # identity path from s0
        res = self.conv_last(F.relu(self.bn_last(s)))
        return (x + res) / self.img_range

    def _can_stream(self, x):
        """Window-scope inference on an image whose long side spans several windows."""
        blk = self.nonlocal_blocks[0]
        return (not self.training and blk.nl_scope == 'window' and blk.window_size > 0 and blk.border == 'exclude'
                and max(x.shape[2:]) >= 4 * blk.window_size)

    @torch.no_grad()
    def _forward_window_stream(self, x):
        """Window-scope inference as a wavefront down the image; same result as ``forward``.

        Step t+1 of the rows [a, a+8) needs step t only down to row a+8+r+2 (window radius r, then
        two 3x3 convs), so all steps run as a pipeline in bands of 8 rows, each band computed at
        the latest moment a later step asks for it. The carried logits (P = q^2 floats a pixel, the
        bulk of the memory) then exist only for the (T-1)(r+2) rows (rounded up to bands) between
        the first and the last step's front instead of the whole image, and the other features for
        a few bands each. The image is transposed (with the 3x3 kernels) so that the bands run
        along its longer side.

        Args:
            x (Tensor): (B, num_in_ch, H, W) at the ``img_range`` scale, eval mode.

        Returns:
            Tensor: (B, num_in_ch, H, W).
        """
        transpose = x.shape[3] > x.shape[2]
        if transpose:
            x = x.transpose(2, 3).contiguous()
        h = x.shape[2]
        ws = self.nonlocal_blocks[0].window_size
        py = min(ws // 2, h - 1)
        out = torch.empty_like(x)
        # Features are channels-last (NHWC in memory): oneDNN's 3x3 convs are faster on it, and the
        # non-local embeddings and attention output are NHWC views of the same memory.
        cl = torch.channels_last
        weights = {}

        def conv_rows(conv, inp, lo, a, e):
            """Rows [a, e) of a 3x3 conv (zero padding) of ``inp``, which holds rows lo.. of its input."""
            t = inp[:, :, max(a - 1, 0) - lo:min(e + 1, h) - lo]
            if a == 0 or e == h:
                t = F.pad(t, (0, 0, int(a == 0), int(e == h))).contiguous(memory_format=cl)
            if conv not in weights:
                weights[conv] = (conv.weight.transpose(2, 3) if transpose else conv.weight).contiguous(memory_format=cl)
            return F.conv2d(t, weights[conv], conv.bias, padding=(0, 1))

        def s0_rows(a, e):
            lo = max(a - 1, 0)
            s0 = conv_rows(self.conv_first, self.bn_first(x[:, :, lo:min(e + 1, h)]), lo, a, e)
            return s0.contiguous(memory_format=cl)     # a 1-channel input gives no layout to follow

        stages = []

        def add(compute, inputs, dims=(2, ), band=None):
            """A stage computing rows [a, e) from ``inputs``: (stage index, rows needed beyond e)."""
            stages.append(_Stage(compute, inputs, dims, band))
            return len(stages) - 1

        def rows_of(src, a, e):
            return s0_rows(a, e) if src < 0 else stages[src].rows(a, e)[0]

        logits = {}     # (step, first row of the band) -> carried logits of that band
        nl_last = self.nl_steps[-1]
        src = -1        # stage holding s_{t-1}; -1: s0, recomputed from x when needed
        for t in range(self.num_steps):
            bn1, bn2, bn3 = self.bns[t]
            i = 0 if len(self.convs_a) == 1 else t
            s_in = [] if src < 0 else [(src, 0)]
            if t in self.nl_steps:
                k_nl = self.nl_steps.index(t)
                blk = self.nonlocal_blocks[0 if len(self.nonlocal_blocks) == 1 else k_nl]

                def keys_values(a, e, src=src, bn1=bn1, blk=blk):
                    """Keys and values, kept over the window's reach (queries: only the band, in ``attend``)."""
                    return blk.embed(F.relu_(bn1(rows_of(src, a, e))).permute(0, 2, 3, 1), query=False)
                kv = add(keys_values, s_in, dims=(1, 1))

                def attend(a, e, t=t, k_nl=k_nl, blk=blk, bn1=bn1, src=src, kv=kv):
                    lo, hi = max(a - py, 0), min(e + py, h)
                    k, v = stages[kv].rows(lo, hi)
                    u = F.relu_(bn1(rows_of(src, a, e)))
                    q = blk.embed(u.permute(0, 2, 3, 1), key_value=False)[0]
                    carry = self.propagate_correlation and t != nl_last
                    prev = logits.pop((self.nl_steps[k_nl - 1], a), None) if self.propagate_correlation and k_nl else None
                    res = window_attention_rows(q, k, v, a - lo, blk.window_size, blk.normalization,
                                                prev_logits=prev, return_logits=carry, image_height=h)
                    if carry:
                        res, logits[(t, a)] = res
                    return (u.add_(res.permute(0, 3, 1, 2)), )     # z + A g (eq. 3)
                z = add(attend, [(kv, py)] + s_in, band=_BAND)
            else:
                z = add(lambda a, e, src=src, bn1=bn1: (F.relu_(bn1(rows_of(src, a, e))), ), s_in)
            hid = add(lambda a, e, z=z, conv=self.convs_a[i], bn=bn2:
                      (conv_rows(conv, bn(stages[z].rows(max(a - 1, 0), min(e + 1, h))[0]), max(a - 1, 0), a, e), ),
                      [(z, 1)])
            src = add(lambda a, e, hid=hid, conv=self.convs_b[i], bn=bn3:
                      (conv_rows(conv, F.relu_(bn(stages[hid].rows(max(a - 1, 0), min(e + 1, h))[0])),
                                 max(a - 1, 0), a, e).add_(s0_rows(a, e)), ), [(hid, 1)])

        def last(a, e):
            lo = max(a - 1, 0)
            s = F.relu(self.bn_last(rows_of(src, lo, min(e + 1, h))))
            out[:, :, a:e] = x[:, :, a:e] + conv_rows(self.conv_last, s, lo, a, e)
        add(last, [(src, 1)] if src >= 0 else [])
        readers = {}
        for j, st in enumerate(stages):
            for src_j, need in st.inputs:
                readers.setdefault(src_j, []).append((st, need))

        def ensure(j, e):
            st = stages[j]
            e = min(e, h)
            if st.band:
                e = min(h, -(-e // st.band) * st.band)
            if st.front >= e:
                return
            for src_j, need in st.inputs:
                ensure(src_j, e + need)
            while st.front < e:
                b = min(st.front + (st.band or 4 * _BAND), e)
                st.append(st.compute(st.front, b), b)
            for src_j, _ in st.inputs:     # rows no reader needs any more
                stages[src_j].drop_before(min(r.front - need for r, need in readers[src_j]))

        try:
            for e in range(_BAND, h + _BAND, _BAND):
                ensure(len(stages) - 1, e)
        finally:
            # The stage closures and ``ensure`` form reference cycles: drop the row buffers now
            # rather than at the next full garbage collection (else memory grows image after image).
            stages.clear()
            readers.clear()
            logits.clear()
        return out.transpose(2, 3).contiguous() if transpose else out


class _Stage:
    """One row-streamed computation of ``NLRN._forward_window_stream`` and its output rows [lo, front).

    The rows live in buffers used as a sliding window: appended rows are written after the kept
    ones and the buffers are only reallocated (kept rows copied) when full or far too large, so a
    band costs no copy of the rows kept for the readers' halo.
    """

    def __init__(self, compute, inputs, dims, band):
        self.compute, self.inputs, self.dims, self.band = compute, inputs, dims, band
        self.lo = self.front = 0
        self.bufs, self.off, self.cap = None, 0, 0     # buffers, buffer row of ``lo``, buffer rows

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
