"""Shared pieces of the benchmark cases: device sync and seeded inputs."""
import torch


def sync(device: str) -> None:
    """Wait for queued GPU work, so a case's time covers it (no-op on the CPU)."""
    if device == 'cuda':
        torch.cuda.synchronize()


def image(h: int, w: int, device: str, c: int = 1, batch: int = 1) -> torch.Tensor:
    """A seeded (batch, c, h, w) image in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, c, h, w, generator=g).to(device)
