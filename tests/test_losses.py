import pytest
import torch
from basicsr.losses import build_loss


def test_squared_error_loss_values():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    target = torch.zeros_like(pred)
    total = 0.5 * (1 + 4 + 9 + 16 + 1)  # 15.5
    batch = build_loss({'type': 'SquaredErrorLoss'})
    assert batch(pred, target).item() == pytest.approx(total / 2)
    pixel = build_loss({'type': 'SquaredErrorLoss', 'normalization': 'pixel', 'loss_weight': 2.0})
    assert pixel(pred, target).item() == pytest.approx(2.0 * total / 8)
    summed = build_loss({'type': 'SquaredErrorLoss', 'normalization': 'sum'})
    assert summed(pred, target).item() == pytest.approx(total)
    mse = build_loss({'type': 'MSELoss'})
    assert pixel(pred, target).item() == pytest.approx(mse(pred, target).item())  # 2 * 0.5 * MSE


def test_squared_error_loss_errors():
    with pytest.raises(ValueError, match='normalization'):
        build_loss({'type': 'SquaredErrorLoss', 'normalization': 'mean'})
    with pytest.raises(ValueError, match='shape'):
        build_loss({'type': 'SquaredErrorLoss'})(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
