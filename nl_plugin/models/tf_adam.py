"""``TFAdam``: Adam with TensorFlow 1's epsilon semantics (``tf.train.AdamOptimizer``), as NLRN's code trains.

TF1 updates ``var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``: its epsilon is the
"epsilon hat" of Kingma & Ba (Sec. 2, before Algorithm 1), added to the raw ``sqrt(v)``. PyTorch's Adam
adds epsilon to the bias-corrected ``sqrt(v) / sqrt(1 - b2^t)``. The two agree when torch's epsilon
is ``eps / sqrt(1 - b2^t)``: 32x TF's at t = 1 (b2 = 0.999), tending to TF's after a few thousand
steps. The difference matters for parameters with gradients near ``eps`` (NLRN's theta/phi start with
exactly zero gradients, g being zero-initialised).
"""
import math

import torch


class TFAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose ``eps`` is TF1's epsilon hat.

    Every step sets each group's torch ``eps`` to ``eps_hat / sqrt(1 - beta2^t)``, ``t`` being the step
    about to be taken (TF's ``beta2_power``), then runs torch's Adam. Exact where every parameter of a
    group gets a gradient at every step (TF counts steps globally, torch per parameter).

    Args:
        params (iterable): Parameters or parameter groups.
        lr (float): Learning rate. Default: 1e-3.
        betas (tuple[float, float]): beta1, beta2. Default: (0.9, 0.999).
        eps (float): TF's epsilon (epsilon hat). Default: 1e-8 (``tf.train.AdamOptimizer``'s).
        weight_decay (float): Torch's coupled L2 decay (TF's Adam has none). Default: 0.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for group in self.param_groups:
            group['eps_hat'] = group['eps']

    def step(self, closure=None):
        for group in self.param_groups:
            group.setdefault('eps_hat', group['eps'])
            first = next((p for p in group['params'] if p.grad is not None), None)
            if first is None:
                continue
            state = self.state.get(first, {})
            t = int(state['step']) + 1 if 'step' in state else 1
            group['eps'] = group['eps_hat'] / math.sqrt(1.0 - group['betas'][1]**t)
        return super().step(closure)
