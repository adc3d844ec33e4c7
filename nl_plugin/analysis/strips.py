"""Side-by-side image strips (degraded | restored | ground truth) for logs and TensorBoard."""
import torch
import torch.nn.functional as F


def comparison_strip(panels, crop=160, gap=2):
    """Centre crops of images of one scene, side by side, with white gaps.

    Args:
        panels (list[Tensor]): (1, C, h, w) images in [0, 1]; the second one (the restored image) sets the
            size, smaller ones (an SR input) are enlarged to it (nearest neighbour). Extra channels beyond
            the restored image's (noise maps) are dropped; one channel is shown as gray.
        crop (int): Largest side of the crops.
        gap (int): Width of the white gaps.

    Returns:
        Tensor: (3, ch, len(panels) * cw + (len(panels) - 1) * gap) float image in [0, 1].
    """
    ref = panels[1] if len(panels) > 1 else panels[0]
    c, (h, w) = ref.shape[1], ref.shape[-2:]
    ch, cw = min(h, crop), min(w, crop)
    top, left = (h - ch) // 2, (w - cw) // 2
    parts = []
    for p in panels:
        p = p.detach().float().cpu()[:1, :c]
        if p.shape[-2:] != (h, w):
            p = F.interpolate(p, size=(h, w), mode='nearest')
        p = p[..., top:top + ch, left:left + cw].clamp(0, 1)
        parts += [p.expand(1, 3, ch, cw) if p.shape[1] == 1 else p[:, :3], torch.ones(1, 3, ch, gap)]
    return torch.cat(parts[:-1], dim=3)[0]
