"""Fused Triton kernel of one propagated NLRN window step, forward and backward (CUDA; CPU under Triton's interpreter).

One step (NLRN eq. 5-6) for every query pixel i and key j in its q x q window:

    L_t(i, j) = L_{t-1}(i, j) + q_t(i) . k_t(j);    out(i) = sum_j A(i, j) v(j),   A = softmax_j L_t  (or L_t / N_i)

The carried logits are the compact image layout of ``window_attention`` (``Layout.IMAGE``):
``logits[b, y, x, (dy+py)*kw + (dx+px)]`` for the neighbour (y+dy, x+dx), fp32 (fp64 for fp64 inputs), the entries of
out-of-image neighbours unspecified. Each query slot belongs to exactly one query pixel, so a program that owns a
tile of query pixels reads and writes its queries' slots in place without races.

Forward (``_fwd_kernel``): a program owns a BY x BX tile of query pixels (8 x 16: 128 rows of ``tl.dot``) and loops
over the key rows of its halo (the tile's rows +- py, clipped to the image for border 'exclude', wrapped for
'circular'). Per key row it loads the BX + 2px key columns (zero-padded to BLOCK_K, a power of two) once for the
whole tile, computes S = Q K^T with fp32 accumulation, adds the carried logits (skipped at the first step), writes the
sum back (skipped at the last) and runs an online softmax (running maximum and normaliser, as flash attention) over
the entries inside the clipped window, then multiplies by V. For q = 45 a program touches 52 key rows of 64 columns
for 45 x 45 useful entries per query: 1.6x the useful products, each carried logit read and written once.

Backward without a copy of every step's logits: the carry buffer holds L_T after the forward. Going backwards, the
step that wrote L_t reads it, and its key-major pass restores L_{t-1} = L_t - S_t in the same buffer (each slot
owned by one key pixel there), so step t-1 finds its own logits (to within an fp32 rounding of L_t per step,
as the recomputed S_t is the forward's own product). The gradient of the carried logits
(dL_{t-1} = dL_t, plus the softmax term of step t) is updated in place in one more buffer of the same size:
training holds two carried-logit tensors. Two kernels per step: ``_bwd_q_kernel`` (query-major: dS into the
gradient buffer, dq) and ``_bwd_kv_kernel`` (key-major over the same window, which is symmetric: dk, dv and the
restore). A shared ``_Carry`` counts the steps in the buffer, so a second backward through the same graph (whose
buffer was already rewound) is refused instead of giving wrong gradients.

Precision (``common.py``): q, k, v arrive in the compute dtype (bf16/fp16 under autocast); the products accumulate
in fp32 and the logits, their running sum, the softmax statistics and the count division are fp32; the weights
enter the value product in v's dtype. fp32 inputs use TF32 products only where
``torch.backends.cuda.matmul.allow_tf32`` allows it, exact fp32 ('ieee') otherwise.

``triton_window_rows`` runs the forward on a band of query rows with the key rows of its reach (inference; the
network streams bands through all steps with it, ``nlrn_stream``). On CUDA a Triton error while building the
kernels (resources a GPU lacks for some widths) is remembered per widths and dtype and those steps run on the halo
kernels instead, with a warning; the backward kernels are built before the forward touches the carry, so that this
also holds in training. The GPU speed of this kernel has not been measured yet (``scripts/gpu_check.py`` does).
"""
import logging
import os
from typing import Optional

import torch

from .common import WindowGeometry

try:
    import triton
    import triton.language as tl
except ImportError:      # the router never picks this kernel then
    triton = tl = None
# Annotation of the kernels' compile-time arguments (an object, not a string: the interpreter needs it evaluated).
constexpr = tl.constexpr if tl is not None else 'constexpr'

logger = logging.getLogger('nl_plugin')

#: query tile of a forward program (rows, columns): 128 query rows of ``tl.dot``
TILE_Y, TILE_X = 8, 16
NUM_WARPS = 8
#: (device type, dtype, widths, window) whose kernels failed to compile: the halo kernels run them instead
_FAILED = set()
#: devices where a Triton error falls back to the halo kernels (not the interpreter: there it is a bug to see)
FALLBACK_DEVICES = ('cuda', )


def available() -> bool:
    """Whether Triton is importable."""
    return triton is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (how the kernel runs on the CPU)."""
    return os.environ.get('TRITON_INTERPRET', '0').strip().lower() not in ('', '0', 'false', 'no')


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the kernel cannot run on ``device`` (one line), or None when it can."""
    if triton is None:
        return "attention_kernel='triton' needs the triton package, which is not importable here"
    if device.type == 'cpu':
        if not interpreting():
            return ("attention_kernel='triton' runs on the CPU only under Triton's interpreter: set "
                    "TRITON_INTERPRET=1 (slow, meant for tests), or use attention_kernel='auto'")
        return None
    if device.type != 'cuda':
        return f"attention_kernel='triton' runs on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {device}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Plain functions, turned into Triton kernels on first use (``_compiled``): compiled for CUDA tensors,
# interpreted for CPU tensors, whatever ``TRITON_INTERPRET`` was when triton was imported. So they call Triton's
# builtins only: the library's @jit helpers (tl.zeros, tl.max, tl.sum, tl.cdiv) exist in one of the two modes, and
# the reductions name their combine functions, which the interpreter recognises and runs as numpy reductions.
# ----------------------------------------------------------------------------------------------------------------

def _fwd_kernel(Q, K, V, L, OUT, LSE, H, W, D, C, PY, PX, KW, P, QROW0, HQ,
                BY: constexpr, BX: constexpr, BLOCK_K: constexpr, BLOCK_D: constexpr,
                BLOCK_C: constexpr, CIRCULAR: constexpr, HAS_PREV: constexpr, STORE: constexpr,
                COUNT: constexpr, SAVE_LSE: constexpr, PREC: constexpr, ACC: constexpr, DT: constexpr):
    """Forward of the HQ query rows that are rows QROW0.. of the H x W key image (a band; the whole image:
    QROW0 = 0, HQ = H). Q, OUT, LSE and L are indexed by query rows, K and V by key-image rows."""
    pid = tl.program_id(0)
    bb = tl.program_id(1).to(tl.int64)
    ntx = (W + BX - 1) // BX
    y0 = (pid // ntx) * BY
    x0 = (pid % ntx) * BX
    qi = tl.arange(0, BY * BX)
    qyl = y0 + qi // BX                                  # query row of the band
    qy = QROW0 + qyl                                     # its row in the key image
    qx = x0 + qi % BX
    q_ok = (qyl < HQ) & (qx < W)
    qpix = bb * HQ * W + qyl * W + qx
    od = tl.arange(0, BLOCK_D)
    oc = tl.arange(0, BLOCK_C)
    q = tl.load(Q + qpix[:, None] * D + od[None, :], mask=q_ok[:, None] & (od < D)[None, :], other=0.).to(DT)
    kj = tl.arange(0, BLOCK_K)
    kxu = x0 - PX + kj                                   # key column, before wrapping
    if CIRCULAR:
        col_ok = kj < BX + 2 * PX
        kx = ((kxu % W) + W) % W
        lo = y0 - PY
        hi = y0 + BY + PY
        cnt = ((2 * PY + 1) * (2 * PX + 1) + qy * 0).to(ACC)
    else:
        col_ok = (kxu >= 0) & (kxu < W)
        kx = tl.where(col_ok, kxu, 0)
        lo = tl.maximum(QROW0 + y0 - PY, 0)
        hi = tl.minimum(QROW0 + y0 + BY + PY, H)
        rows = tl.minimum(qy + PY, H - 1) - tl.maximum(qy - PY, 0) + 1
        cols = tl.minimum(qx + PX, W - 1) - tl.maximum(qx - PX, 0) + 1
        cnt = (rows * cols).to(ACC)
    dx = kxu[None, :] - qx[:, None]
    win_x = (dx >= -PX) & (dx <= PX) & col_ok[None, :] & q_ok[:, None]
    lbase = L + qpix[:, None] * P + PY * KW + PX + dx    # slot of (dy = 0, dx)
    m_i = tl.full([BY * BX], float('-inf'), ACC)
    l_i = tl.full([BY * BX], 0., ACC)
    acc = tl.full([BY * BX, BLOCK_C], 0., ACC)
    for yku in range(lo, hi):
        if CIRCULAR:
            ky = ((yku % H) + H) % H
        else:
            ky = yku
        dy = yku - qy
        valid = win_x & ((dy >= -PY) & (dy <= PY))[:, None]
        kpix = bb * H * W + ky * W + kx
        k = tl.load(K + kpix[:, None] * D + od[None, :], mask=col_ok[:, None] & (od < D)[None, :], other=0.).to(DT)
        v = tl.load(V + kpix[:, None] * C + oc[None, :], mask=col_ok[:, None] & (oc < C)[None, :], other=0.).to(DT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        lp = lbase + dy[:, None] * KW
        if HAS_PREV:
            s += tl.load(lp, mask=valid, other=0.)
        if STORE:
            tl.store(lp, s, mask=valid)
        if COUNT:
            acc += tl.dot(tl.where(valid, s, 0.).to(V.dtype.element_ty).to(DT), v, input_precision=PREC, out_dtype=ACC)
        else:
            sm = tl.where(valid, s, float('-inf'))
            m_new = tl.maximum(m_i, tl.reduce(sm, 1, tl.standard._elementwise_max))
            m_safe = tl.where(m_new == float('-inf'), 0., m_new)     # no key yet: keep the sums at 0
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(sm - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
            acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(DT), v, input_precision=PREC, out_dtype=ACC)
            m_i = m_new
    if COUNT:
        out = acc / cnt[:, None]
    else:
        out = acc / tl.where(l_i == 0., 1., l_i)[:, None]
        if SAVE_LSE:
            tl.store(LSE + qpix, m_i + tl.log(l_i), mask=q_ok)
    tl.store(OUT + qpix[:, None] * C + oc[None, :], out.to(OUT.dtype.element_ty),
             mask=q_ok[:, None] & (oc < C)[None, :])


def _bwd_q_kernel(Q, K, V, L, G, DO, LSE, DLT, DQ, H, W, D, C, PY, PX, KW, P,
                  BY: constexpr, BX: constexpr, BLOCK_K: constexpr, BLOCK_D: constexpr,
                  BLOCK_C: constexpr, CIRCULAR: constexpr, L_MODE: constexpr, HAS_G: constexpr,
                  COUNT: constexpr, PREC: constexpr, ACC: constexpr, DT: constexpr):
    """Query-major backward: dS = dL_t (softmax term plus the carried gradient G) into G in place, dq = dS K.
    L_MODE: 0 logits are S (no buffer), 1 the buffer holds L_t, 2 it holds L_{t-1} (the step did not write)."""
    pid = tl.program_id(0)
    bb = tl.program_id(1).to(tl.int64)
    ntx = (W + BX - 1) // BX
    y0 = (pid // ntx) * BY
    x0 = (pid % ntx) * BX
    qi = tl.arange(0, BY * BX)
    qy = y0 + qi // BX
    qx = x0 + qi % BX
    q_ok = (qy < H) & (qx < W)
    qpix = bb * H * W + qy * W + qx
    od = tl.arange(0, BLOCK_D)
    oc = tl.arange(0, BLOCK_C)
    q = tl.load(Q + qpix[:, None] * D + od[None, :], mask=q_ok[:, None] & (od < D)[None, :], other=0.).to(DT)
    do = tl.load(DO + qpix[:, None] * C + oc[None, :], mask=q_ok[:, None] & (oc < C)[None, :], other=0.).to(DT)
    kj = tl.arange(0, BLOCK_K)
    kxu = x0 - PX + kj
    if CIRCULAR:
        col_ok = kj < BX + 2 * PX
        kx = ((kxu % W) + W) % W
        lo = y0 - PY
        hi = y0 + BY + PY
        cnt = ((2 * PY + 1) * (2 * PX + 1) + qy * 0).to(ACC)
    else:
        col_ok = (kxu >= 0) & (kxu < W)
        kx = tl.where(col_ok, kxu, 0)
        lo = tl.maximum(y0 - PY, 0)
        hi = tl.minimum(y0 + BY + PY, H)
        rows = tl.minimum(qy + PY, H - 1) - tl.maximum(qy - PY, 0) + 1
        cols = tl.minimum(qx + PX, W - 1) - tl.maximum(qx - PX, 0) + 1
        cnt = (rows * cols).to(ACC)
    if COUNT:
        lse = tl.full([BY * BX], 0., ACC)
        dlt = tl.full([BY * BX], 0., ACC)
    else:
        lse = tl.load(LSE + qpix, mask=q_ok, other=0.)
        dlt = tl.load(DLT + qpix, mask=q_ok, other=0.)
    dx = kxu[None, :] - qx[:, None]
    win_x = (dx >= -PX) & (dx <= PX) & col_ok[None, :] & q_ok[:, None]
    slot = qpix[:, None] * P + PY * KW + PX + dx
    dq = tl.full([BY * BX, BLOCK_D], 0., ACC)
    for yku in range(lo, hi):
        if CIRCULAR:
            ky = ((yku % H) + H) % H
        else:
            ky = yku
        dy = yku - qy
        valid = win_x & ((dy >= -PY) & (dy <= PY))[:, None]
        kpix = bb * H * W + ky * W + kx
        k = tl.load(K + kpix[:, None] * D + od[None, :], mask=col_ok[:, None] & (od < D)[None, :], other=0.).to(DT)
        v = tl.load(V + kpix[:, None] * C + oc[None, :], mask=col_ok[:, None] & (oc < C)[None, :], other=0.).to(DT)
        sl = slot + dy[:, None] * KW
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        if COUNT:
            ds = dp / cnt[:, None]
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
            if L_MODE == 1:
                lg = tl.load(L + sl, mask=valid, other=0.)
            elif L_MODE == 2:
                lg = tl.load(L + sl, mask=valid, other=0.) + s
            else:
                lg = s
            p = tl.exp(tl.where(valid, lg, float('-inf')) - lse[:, None])
            ds = p * (dp - dlt[:, None])
        if HAS_G:
            ds += tl.load(G + sl, mask=valid, other=0.)
        ds = tl.where(valid, ds, 0.)
        tl.store(G + sl, ds, mask=valid)
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DT), k, input_precision=PREC, out_dtype=ACC)
    tl.store(DQ + qpix[:, None] * D + od[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok[:, None] & (od < D)[None, :])


def _bwd_kv_kernel(Q, K, L, G, DO, LSE, DK, DV, H, W, D, C, PY, PX, KW, P,
                   BY: constexpr, BX: constexpr, BLOCK_K: constexpr, BLOCK_D: constexpr,
                   BLOCK_C: constexpr, CIRCULAR: constexpr, L_MODE: constexpr,
                   RESTORE: constexpr, COUNT: constexpr, PREC: constexpr, ACC: constexpr, DT: constexpr):
    """Key-major backward over the (symmetric) window: a program owns a tile of key pixels and loops over the query
    rows of its halo. dk = dS^T Q (dS from G, written by ``_bwd_q_kernel``), dv = A^T dO; with RESTORE the slots
    of its keys go back to L_{t-1} = L_t - S_t (each slot belongs to one key pixel)."""
    pid = tl.program_id(0)
    bb = tl.program_id(1).to(tl.int64)
    ntx = (W + BX - 1) // BX
    y0 = (pid // ntx) * BY
    x0 = (pid % ntx) * BX
    ki = tl.arange(0, BY * BX)
    ky = y0 + ki // BX
    kx = x0 + ki % BX
    k_ok = (ky < H) & (kx < W)
    kpix = bb * H * W + ky * W + kx
    od = tl.arange(0, BLOCK_D)
    oc = tl.arange(0, BLOCK_C)
    k = tl.load(K + kpix[:, None] * D + od[None, :], mask=k_ok[:, None] & (od < D)[None, :], other=0.).to(DT)
    qj = tl.arange(0, BLOCK_K)
    qxu = x0 - PX + qj                                   # query column, before wrapping
    if CIRCULAR:
        col_ok = qj < BX + 2 * PX
        qx = ((qxu % W) + W) % W
        lo = y0 - PY
        hi = y0 + BY + PY
    else:
        col_ok = (qxu >= 0) & (qxu < W)
        qx = tl.where(col_ok, qxu, 0)
        lo = tl.maximum(y0 - PY, 0)
        hi = tl.minimum(y0 + BY + PY, H)
        cols = tl.minimum(qx + PX, W - 1) - tl.maximum(qx - PX, 0) + 1
    dx = kx[:, None] - qxu[None, :]                      # key minus query
    win_x = (dx >= -PX) & (dx <= PX) & col_ok[None, :] & k_ok[:, None]
    dk = tl.full([BY * BX, BLOCK_D], 0., ACC)
    dv = tl.full([BY * BX, BLOCK_C], 0., ACC)
    for yqu in range(lo, hi):
        if CIRCULAR:
            yq = ((yqu % H) + H) % H
            cnt = ((2 * PY + 1) * (2 * PX + 1) + qj * 0).to(ACC)
        else:
            yq = yqu
            cnt = ((tl.minimum(yq + PY, H - 1) - tl.maximum(yq - PY, 0) + 1) * cols).to(ACC)
        dy = ky - yqu
        valid = win_x & ((dy >= -PY) & (dy <= PY))[:, None]
        qpix = bb * H * W + yq * W + qx
        q = tl.load(Q + qpix[:, None] * D + od[None, :], mask=col_ok[:, None] & (od < D)[None, :], other=0.).to(DT)
        do = tl.load(DO + qpix[:, None] * C + oc[None, :], mask=col_ok[:, None] & (oc < C)[None, :], other=0.).to(DT)
        sl = qpix[None, :] * P + (dy + PY)[:, None] * KW + PX + dx
        if L_MODE == 1:
            lg = tl.load(L + sl, mask=valid, other=0.)
        else:
            s = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC)
            if L_MODE == 2:
                lg = tl.load(L + sl, mask=valid, other=0.) + s
            else:
                lg = s
        if COUNT:
            a = tl.where(valid, lg, 0.) / cnt[None, :]
        else:
            lse = tl.load(LSE + qpix, mask=col_ok, other=0.)
            a = tl.exp(tl.where(valid, lg, float('-inf')) - lse[None, :])
        ds = tl.load(G + sl, mask=valid, other=0.)
        dv += tl.dot(a.to(DO.dtype.element_ty).to(DT), do, input_precision=PREC, out_dtype=ACC)
        dk += tl.dot(ds.to(Q.dtype.element_ty).to(DT), q, input_precision=PREC, out_dtype=ACC)
        if RESTORE:
            s = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC)
            tl.store(L + sl, lg - s, mask=valid)
    tl.store(DK + kpix[:, None] * D + od[None, :], dk.to(DK.dtype.element_ty), mask=k_ok[:, None] & (od < D)[None, :])
    tl.store(DV + kpix[:, None] * C + oc[None, :], dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & (oc < C)[None, :])


_COMPILED = {}


def _compiled(fn, device: torch.device):
    """``fn`` as a Triton kernel: interpreted for CPU tensors, compiled otherwise."""
    interpret = device.type == 'cpu'
    key = (fn.__name__, interpret)
    if key not in _COMPILED:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            _COMPILED[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction
            _COMPILED[key] = JITFunction(fn)
    return _COMPILED[key]


_TL_DTYPES = {} if tl is None else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                                    torch.float64: tl.float64}


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def _meta(q, v, geo: WindowGeometry, normalization: str):
    """Launch grid and the compile-time arguments shared by the three kernels."""
    b, h, w, d = q.shape
    f64 = q.dtype == torch.float64
    if q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        prec = 'tf32'
    else:
        prec = 'ieee'
    # Operand dtype of the products: the inputs' own. The interpreter multiplies bf16 as raw 16-bit integers, so
    # there bf16 operands (already rounded to bf16) are widened to fp32: the same products, accumulated in fp32.
    dt = _TL_DTYPES[q.dtype]
    if dt is tl.bfloat16 and q.device.type == 'cpu':
        dt = tl.float32
    meta = dict(BY=TILE_Y, BX=TILE_X, BLOCK_K=_pow2(TILE_X + 2 * geo.px), BLOCK_D=_pow2(d), BLOCK_C=_pow2(v.shape[-1]),
                CIRCULAR=geo.circular, COUNT=normalization == 'count', PREC=prec,
                ACC=tl.float64 if f64 else tl.float32, DT=dt)
    grid = (triton.cdiv(h, TILE_Y) * triton.cdiv(w, TILE_X), b)
    return grid, meta


def _sizes(q, v, geo):
    _, h, w, d = q.shape
    return h, w, d, v.shape[-1], geo.py, geo.px, geo.kw, geo.p


def _forward(q, k, v, logits, geo, normalization, has_prev, store, save_lse, row0=0):
    """Launch the forward kernel; ``logits`` (B, Hq, W, P) is read when ``has_prev`` and written when ``store``.
    ``q`` holds the query rows ``row0 .. row0 + Hq`` of the key image ``k``/``v`` (all of it by default)."""
    grid, meta = _meta(q, v, geo, normalization)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device) if save_lse else out
    lg = logits if logits is not None else out      # a placeholder pointer when unused
    _, hk, w, d = k.shape
    _compiled(_fwd_kernel, q.device)[grid](q, k, v, lg, out, lse, hk, w, d, v.shape[-1], geo.py, geo.px, geo.kw,
                                           geo.p, row0, q.shape[1], HAS_PREV=has_prev, STORE=store,
                                           SAVE_LSE=save_lse, num_warps=NUM_WARPS, **meta)
    return out, (lse if save_lse else None)


class _Carry:
    """How many steps' products the carried-logit buffer holds (checks that backward rewinds it in order)."""
    __slots__ = ('steps', )

    def __init__(self):
        self.steps = 0


class _WindowStep(torch.autograd.Function):
    """One step with autograd; the carry buffer is updated in place (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, prev, geo, normalization, store, carry):
        ctx.mode = 1 if store else (2 if prev is not None else 0)
        ctx.restore = store and prev is not None
        if q.is_cuda:       # before the forward changes the carry in place
            _warm_backward(q, k, v, geo, normalization, ctx.mode, ctx.restore)
        if store:
            logits = prev if prev is not None else \
                torch.empty(*q.shape[:3], geo.p, dtype=_acc(q), device=q.device)
        else:
            logits = None
        out, lse = _forward(q, k, v, logits if store else prev, geo, normalization, prev is not None, store,
                            normalization == 'softmax')
        if store:
            carry.steps += 1
        buf = logits if store else prev
        # A detached alias, not ``save_for_backward``: the next step changes the buffer in place (its version),
        # and its backward gives it back as it was here.
        ctx.buf = None if buf is None else buf.detach()
        ctx.geo, ctx.normalization, ctx.carry, ctx.level = geo, normalization, carry, carry.steps
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        if store and prev is not None:
            ctx.mark_dirty(prev)
        return out, logits

    @staticmethod
    def backward(ctx, dout, dlogits):
        q, k, v, out, lse = ctx.saved_tensors
        geo, normalization = ctx.geo, ctx.normalization
        if ctx.carry.steps != ctx.level:
            raise RuntimeError('triton window attention: the carried logits were already rewound by a backward '
                               'through this graph; a second backward (retain_graph=True) is not supported')
        acc = _acc(q)
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype).contiguous()
        if dlogits is not None and _own_buffer(dlogits, acc):
            g = dlogits                 # the next step's gradient buffer: updated in place
        elif dlogits is not None:
            g = dlogits.to(acc, copy=True, memory_format=torch.contiguous_format)
        else:           # zeros: the gradient of out-of-window slots of the carried logits is 0
            g = torch.zeros(*q.shape[:3], geo.p, dtype=acc, device=q.device)
        dlt = (dout.to(acc) * out.to(acc)).sum(-1) if normalization == 'softmax' else None
        grid, meta = _meta(q, v, geo, normalization)
        buf = ctx.buf if ctx.buf is not None else g          # placeholder pointers where unused
        lse_arg = lse if lse is not None else g
        dlt_arg = dlt if dlt is not None else g
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sizes = _sizes(q, v, geo)
        _compiled(_bwd_q_kernel, q.device)[grid](q, k, v, buf, g, dout, lse_arg, dlt_arg, dq, *sizes, L_MODE=ctx.mode,
                                                 HAS_G=dlogits is not None, num_warps=NUM_WARPS, **meta)
        _compiled(_bwd_kv_kernel, q.device)[grid](q, k, buf, g, dout, lse_arg, dk, dv, *sizes, L_MODE=ctx.mode,
                                                  RESTORE=ctx.restore, num_warps=NUM_WARPS, **meta)
        if ctx.restore:
            ctx.carry.steps -= 1
        return dq, dk, dv, (g if ctx.needs_input_grad[3] else None), None, None, None, None


def _warm_backward(q, k, v, geo, normalization, mode, restore):
    """Compile the backward kernels of this step now (cached after the first step), so that a GPU that cannot
    build them fails in the forward, before it touches the carry, where the caller can still run the halo kernels
    instead. Any other failure of this early compilation is left to the backward itself."""
    grid, meta = _meta(q, v, geo, normalization)
    acc = _acc(q)
    sizes = _sizes(q, v, geo)
    try:
        for has_g in (False, True):
            _compiled(_bwd_q_kernel, q.device).warmup(q.dtype, k.dtype, v.dtype, acc, acc, v.dtype, acc, acc, q.dtype,
                                                      *sizes, L_MODE=mode, HAS_G=has_g, num_warps=NUM_WARPS,
                                                      grid=grid, **meta)
        _compiled(_bwd_kv_kernel, q.device).warmup(q.dtype, k.dtype, acc, acc, v.dtype, acc, k.dtype, v.dtype,
                                                   *sizes, L_MODE=mode, RESTORE=restore, num_warps=NUM_WARPS,
                                                   grid=grid, **meta)
    except Exception as err:      # noqa: BLE001
        if isinstance(err, triton.TritonError):
            raise
        logger.debug('nlrn attention: the Triton backward kernels did not compile ahead (%s: %s)',
                     type(err).__name__, err)


def _own_buffer(t, dtype):
    """Whether gradient ``t`` is a whole dense tensor of ``dtype`` (not a view or an expanded broadcast)."""
    return t.dtype == dtype and t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _failure_key(q, v, geo):
    return q.device.type, q.dtype, q.shape[-1], v.shape[-1], geo.px, geo.circular


def compile_failed(q: torch.Tensor, v: torch.Tensor, geo: WindowGeometry) -> bool:
    """Whether the kernel failed to compile for these widths and dtype before (``note_failure``)."""
    return _failure_key(q, v, geo) in _FAILED


def note_failure(err: Exception, q: torch.Tensor, v: torch.Tensor, geo: WindowGeometry) -> bool:
    """If ``err`` is Triton's (a compilation error, resources a GPU lacks), remember it for these widths and dtype,
    warn once and return True (the caller runs the halo kernels instead); else False (the caller re-raises)."""
    if triton is None or not isinstance(err, triton.TritonError) or q.device.type not in FALLBACK_DEVICES:
        return False
    key = _failure_key(q, v, geo)
    if key not in _FAILED:
        _FAILED.add(key)
        logger.warning('nlrn attention: the Triton window step failed for %s; the halo kernels run instead. %s: %s',
                       key, type(err).__name__, str(err).splitlines()[0] if str(err) else '')
    return True


# A compiled network runs the step eagerly (a graph break): the launches, the in-place carry and its autograd
# bookkeeping stay outside the traced graph.
@torch.compiler.disable
def triton_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: WindowGeometry,
                            normalization: str, prev_logits: Optional[torch.Tensor] = None,
                            return_logits: bool = False):
    """One window step on the fused kernel (validated arguments; see the module docstring).

    Args:
        q, k (Tensor): (B, H, W, D) embeddings. v (Tensor): (B, H, W, C) values (any strides).
        geo (WindowGeometry): Window reach on this image (``window_geometry``).
        normalization (str): 'softmax' or 'count'.
        prev_logits (Tensor, optional): (B, H, W, P) carried logits in the compact image layout, fp32 (fp64 for
            fp64 inputs). Updated IN PLACE to the new logits when ``return_logits`` (a contiguous tensor that is
            not a leaf requiring grad; otherwise a copy is made).
        return_logits (bool): Also return the accumulated logits (B, H, W, P); without it they are not written.

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, H, W, C) in v's dtype [, logits].
    """
    reason = unavailable_reason(q.device)
    if reason:
        raise RuntimeError(reason)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    acc = _acc(q)
    if prev_logits is not None:
        if tuple(prev_logits.shape) != (*q.shape[:3], geo.p):
            raise ValueError(f'prev_logits must have shape {(*q.shape[:3], geo.p)} (compact window layout), '
                             f'got {tuple(prev_logits.shape)}')
        if prev_logits.dtype != acc or not prev_logits.is_contiguous() or \
                (return_logits and prev_logits.requires_grad and prev_logits.is_leaf):
            prev_logits = prev_logits.to(acc).contiguous()
            if prev_logits.requires_grad and prev_logits.is_leaf:
                prev_logits = prev_logits.clone()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, prev_logits))
    if grad:
        carry = getattr(prev_logits, '_nl_carry', None) if prev_logits is not None else None
        if carry is None:
            carry = _Carry()
            if prev_logits is not None:
                carry.steps = 1      # a buffer from elsewhere: rewound by at most one step here
        out, logits = _WindowStep.apply(q, k, v, prev_logits, geo, normalization, return_logits, carry)
        if logits is not None:
            logits._nl_carry = carry
    else:
        logits = None
        if return_logits:
            logits = prev_logits if prev_logits is not None else \
                torch.empty(*q.shape[:3], geo.p, dtype=acc, device=q.device)
        with torch.no_grad():
            out, _ = _forward(q, k, v, logits if return_logits else prev_logits, geo, normalization,
                              prev_logits is not None, return_logits, False)
    return (out, logits) if return_logits else out


@torch.compiler.disable
@torch.no_grad()
def triton_window_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row0: int, geo: WindowGeometry,
                       normalization: str, prev_logits: Optional[torch.Tensor] = None, return_logits: bool = False):
    """Window attention (border 'exclude') of a band of query rows on the fused kernel; inference only.

    The queries are the rows ``row0 .. row0 + n`` of the key image ``k``/``v``, which holds every in-image row their
    windows reach (rows beyond it count as outside the image): the same result as those rows of the whole image's
    step (``window_attention_rows`` with the halo kernels; here the logits keep the image layout).

    Args:
        q (Tensor): (B, n, W, D) query embeddings. k (Tensor): (B, Hk, W, D). v (Tensor): (B, Hk, W, C).
        row0 (int): Row of ``k`` holding the first query row.
        geo (WindowGeometry): Window reach on the whole image (its P fixes the logits' last dimension).
        normalization (str): 'softmax' or 'count'.
        prev_logits (Tensor, optional): (B, n, W, P) carried logits of these rows, updated in place when
            ``return_logits``.
        return_logits (bool): Also return the accumulated logits.

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, n, W, C) [, logits (B, n, W, P)].
    """
    reason = unavailable_reason(q.device)
    if reason:
        raise RuntimeError(reason)
    if geo.circular:
        raise ValueError("bands of rows need border 'exclude'")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    acc = _acc(q)
    if prev_logits is not None:
        prev_logits = prev_logits.to(acc).contiguous()
    logits = None
    if return_logits:
        logits = prev_logits if prev_logits is not None else \
            torch.empty(*q.shape[:3], geo.p, dtype=acc, device=q.device)
    out, _ = _forward(q, k, v, logits if return_logits else prev_logits, geo, normalization, prev_logits is not None,
                      return_logits, False, row0=row0)
    return (out, logits) if return_logits else out


__all__ = ['available', 'interpreting', 'unavailable_reason', 'triton_window_attention', 'triton_window_rows',
           'compile_failed', 'note_failure', 'TILE_Y', 'TILE_X']
