"""The papers' squared-error loss, 1/2 * sum (pred - target)^2, with a documented normalisation."""
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

_NORMALIZATIONS = ('batch', 'pixel', 'sum')


@LOSS_REGISTRY.register()
class SquaredErrorLoss(nn.Module):
    """``loss_weight * 1/2 * sum((pred - target)^2) / Z``.

    NLRN's and N3Net's training objective is half the summed squared error. ``normalization`` sets Z:

    - ``'batch'`` (default): Z = batch size, i.e. 1/2 of the per-image sum of squared errors, averaged
      over the batch (the papers' formula; gradients grow with the patch area).
    - ``'pixel'``: Z = number of elements; equals ``0.5 * MSELoss`` (a learning rate tuned for
      BasicSR's ``MSELoss`` then transfers with a factor of 2).
    - ``'sum'``: Z = 1.

    Args:
        loss_weight (float): Multiplier. Default: 1.0.
        normalization (str): 'batch' | 'pixel' | 'sum'. Default: 'batch'.
    """

    def __init__(self, loss_weight=1.0, normalization='batch'):
        super().__init__()
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f'SquaredErrorLoss: normalization must be one of {_NORMALIZATIONS}, '
                             f'got {normalization!r}')
        self.loss_weight = loss_weight
        self.normalization = normalization

    def forward(self, pred, target, weight=None):
        """
        Args:
            pred (Tensor): (N, C, H, W) prediction.
            target (Tensor): (N, C, H, W) ground truth.
            weight (Tensor, optional): Element-wise weights broadcastable to ``pred``.

        Returns:
            Tensor: Scalar loss.
        """
        if pred.shape != target.shape:
            raise ValueError(f'SquaredErrorLoss: prediction {tuple(pred.shape)} and target '
                             f'{tuple(target.shape)} differ in shape')
        sq = (pred - target).pow(2)
        if weight is not None:
            sq = sq * weight
        total = 0.5 * sq.sum()
        if self.normalization == 'batch':
            total = total / pred.shape[0]
        elif self.normalization == 'pixel':
            total = total / pred.numel()
        return self.loss_weight * total
