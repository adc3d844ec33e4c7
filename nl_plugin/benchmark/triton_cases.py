"""GPU cases of NLRN's window scope on the fused Triton step (``nl_plugin.ops.nlrn_attention.triton_window``).

Each case reports, besides time and peak memory, the bytes it must move through device memory at the least
('bytes'): the runner divides them by the time and the GPU's bandwidth (``gpu_bandwidth_gbs``) and prints the
fraction of that floor reached. The floor counts the carried fp32 window logits only (P = q^2 per pixel), the bulk
of the traffic: over T non-local steps the first writes them, the T-2 middle steps read and write them, the last
reads them: (2T - 2) passes of B*H*W*P*4 bytes. A training iteration adds, going backwards, one read of the logits
and a read and write of their gradient per step (3T passes). Features, weights and convolutions are left out, so
the fraction is an upper bound of how close to the memory floor the whole network runs.

Cases run only with ``--device cuda`` (``GPU_ONLY``): on a CPU the Triton step exists only under the interpreter.
"""
from .common import image, sync

#: GPU memory bandwidth in GB/s by device name (first substring that matches), from the vendors' datasheets;
#: ``NL_PLUGIN_GPU_BANDWIDTH_GBS`` (or ``scripts/benchmark.py --bandwidth_gbs``) overrides it.
GPU_BANDWIDTH_GBS = (('H200', 4800.0), ('H100 PCIe', 2000.0), ('H100 NVL', 3900.0), ('H100', 3350.0),
                     ('A100 80GB PCIe', 1935.0), ('A100-PCIE-40GB', 1555.0), ('A100', 2039.0), ('L40S', 864.0),
                     ('L4', 300.0), ('A10', 600.0), ('RTX 4090', 1008.0), ('RTX 3090', 936.0))
BANDWIDTH_ENV = 'NL_PLUGIN_GPU_BANDWIDTH_GBS'

T, WINDOW, FEAT, EMBED = 12, 45, 128, 64    # the NLRN of these cases (paper defaults)


def gpu_bandwidth_gbs(name: str):
    """Bandwidth of the GPU called ``name`` in GB/s: the override, else the table, else None."""
    import os
    if os.environ.get(BANDWIDTH_ENV):
        return float(os.environ[BANDWIDTH_ENV])
    for key, gbs in GPU_BANDWIDTH_GBS:
        if key.lower() in name.lower():
            return gbs
    return None


def logit_bytes(batch: int, h: int, w: int, steps: int = T, training: bool = False, window: int = WINDOW) -> int:
    """Floor of the carried-logit traffic of one forward (and backward) over ``steps`` steps (module docstring)."""
    p = min(window, 2 * h - 1) * min(window, 2 * w - 1)
    passes = 2 * steps - 2 + (3 * steps if training else 0)
    return passes * batch * h * w * p * 4


def _precision(precision):
    """Context of a precision: 'bf16' autocast, 'tf32' fp32 with TF32 products, 'fp32' exact fp32."""
    import contextlib

    import torch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == 'tf32'
    if precision == 'bf16':
        return lambda: torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext


def _need_cuda(device):
    if device != 'cuda':
        raise RuntimeError('a GPU case (the Triton window step): run with --device cuda')


def case_nlrn_window_triton(size, precision, logit_memory_gb=None):
    """NLRN window scope (q = 45, T = 12) inference on one image on the Triton step; with ``logit_memory_gb`` below
    the whole image's logits, bands of rows stream through all steps."""
    def build(device, quick):
        import torch

        from nl_plugin.archs.nlrn_arch import NLRN
        _need_cuda(device)
        h, w = size if not quick else (size[0] // 8, size[1] // 8)
        net = NLRN(num_feat=FEAT, num_embed=EMBED, num_steps=T, nl_scope='window', window_size=WINDOW,
                   attention_kernel='triton', logit_memory_gb=logit_memory_gb).to(device).eval()
        torch.set_grad_enabled(False)
        ctx = _precision(precision)
        x = image(h, w, device)

        def run():
            with ctx():
                net(x)
            sync(device)
        note = f'{precision}, Triton step' + (', streamed in bands' if logit_memory_gb else '')
        return {'fn': run, 'bytes': logit_bytes(1, h, w), 'note': note}
    return build


def case_train_nlrn_window(batch, size, precision):
    """One training iteration of the window-scope NLRN (q = 45, T = 12) on the Triton step: forward (under bf16
    autocast for 'bf16'), squared-error loss, backward, Adam."""
    def build(device, quick):
        import torch
        from basicsr.losses import build_loss

        import nl_plugin  # noqa: F401  (compat fixes before BasicSR's subpackages load)
        from nl_plugin.archs.nlrn_arch import NLRN
        _need_cuda(device)
        b = batch if not quick else 2
        net = NLRN(num_feat=FEAT, num_embed=EMBED, num_steps=T, nl_scope='window', window_size=WINDOW,
                   attention_kernel='triton').to(device).train()
        opt = torch.optim.Adam(net.parameters(), 1e-4)
        loss_fn = build_loss({'type': 'SquaredErrorLoss'})
        x = torch.rand(b, 1, size, size, device=device)
        ctx = _precision(precision)

        def step():
            opt.zero_grad(set_to_none=True)
            with ctx():
                out = net(x + 0.1 * torch.randn_like(x))
            loss_fn(out.float(), x).backward()
            opt.step()
            sync(device)
        return {'fn': step, 'bytes': logit_bytes(b, size, size, training=True),
                'note': f'batch {b} of {size}x{size}, {precision}, fwd+bwd+Adam'}
    return build


def case_train_rrdb(with_blocks):
    """``options/train_rrdb_nonlocal.yml``'s network (RRDBNet x4 with two window-scope non-local blocks), one
    training iteration at its option file's batch and patch size; without the blocks: the base RRDBNet."""
    def build(device, quick):
        import os

        import torch
        import yaml
        from basicsr.archs import build_network
        from basicsr.losses import build_loss

        import nl_plugin  # noqa: F401
        _need_cuda(device)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, 'options', 'train_rrdb_nonlocal.yml')) as f:
            opt = yaml.safe_load(f)
        net_opt = dict(opt['network_g'], base_pretrained=None)
        if not with_blocks:
            net_opt['blocks'] = []
        train = opt['datasets']['train']
        b, gt = (train['batch_size_per_gpu'] if not quick else 2), train['gt_size']
        scale = net_opt['base'].get('scale', 4)
        net = build_network(net_opt).to(device).train()
        optim = torch.optim.Adam(net.parameters(), 1e-4)
        loss_fn = build_loss({'type': 'L1Loss'})
        x = torch.rand(b, 3, gt // scale, gt // scale, device=device)
        y = torch.rand(b, 3, gt, gt, device=device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # RestorationModel's default

        def step():
            optim.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            optim.step()
            sync(device)
        return {'fn': step, 'note': f"batch {b}, {gt // scale}x{gt // scale} LR patches, "
                                    f"{len(net_opt['blocks'])} window blocks, TF32"}
    return build


CASES = {
    'gpu_nlrn_window_1024x768_bf16': ('NLRN window (q=45, T=12), 1024x768, bf16 autocast, Triton step',
                                      case_nlrn_window_triton((768, 1024), 'bf16')),
    'gpu_nlrn_window_1024x768_tf32': ('NLRN window (q=45, T=12), 1024x768, fp32 with TF32, Triton step',
                                      case_nlrn_window_triton((768, 1024), 'tf32')),
    'gpu_nlrn_window_1024x768_fp32': ('NLRN window (q=45, T=12), 1024x768, exact fp32 (TF32 off), Triton step',
                                      case_nlrn_window_triton((768, 1024), 'fp32')),
    'gpu_nlrn_window_3840x2160_bf16_streamed': ('NLRN window (q=45, T=12), 3840x2160, bf16, bands through the '
                                                'Triton step (16 GB logit ceiling)',
                                                case_nlrn_window_triton((2160, 3840), 'bf16', logit_memory_gb=16)),
    'gpu_train_iter_nlrn_window': ('window-scope NLRN training iteration, batch 16 of 96x96, TF32, Triton step',
                                   case_train_nlrn_window(16, 96, 'tf32')),
    'gpu_train_iter_nlrn_window_bf16': ('window-scope NLRN training iteration, batch 16 of 96x96, bf16 autocast, '
                                        'Triton step', case_train_nlrn_window(16, 96, 'bf16')),
    'gpu_train_iter_rrdb_window': ('RRDBNet x4 + 2 window blocks (train_rrdb_nonlocal.yml), training iteration',
                                   case_train_rrdb(True)),
    'gpu_train_iter_rrdb_base': ('RRDBNet x4 without the blocks, training iteration', case_train_rrdb(False)),
}
#: cases that run only with ``--device cuda``
GPU_ONLY = tuple(CASES)
