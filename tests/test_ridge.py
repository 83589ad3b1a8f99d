"""The refits' ridge solve: the token-space (Woodbury) form equals the direct normal equations."""

import pytest
import torch

from kvsurgeon.convert.linalg import ridge_towards


@pytest.mark.parametrize("N", [7, 50], ids=["fewer-rows-than-inputs", "more-rows"])
def test_ridge_towards_is_the_regularised_least_squares_minimiser(N):
    g = torch.Generator().manual_seed(0)
    d, out, ridge = 20, 6, 0.1
    Z = torch.randn(N, d, generator=g, dtype=torch.float64)
    Y = torch.randn(N, out, generator=g, dtype=torch.float64)
    W0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    W = ridge_towards(Z, Y, W0, ridge)
    lam = ridge * (Z.T @ Z).diagonal().mean()
    want = torch.linalg.solve(Z.T @ Z + lam * torch.eye(d, dtype=torch.float64), Z.T @ Y + lam * W0.T).T
    torch.testing.assert_close(W, want, rtol=1e-10, atol=1e-10)
    # and it is a minimiser: the gradient of the objective vanishes
    grad = -(Y - Z @ W.T).T @ Z + lam * (W - W0)
    assert grad.abs().max() < 1e-9
