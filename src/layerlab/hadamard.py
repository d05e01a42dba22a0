"""Hadamard matrices of the orders hidden sizes have: 2^k times a Paley order.

A Hadamard matrix H (entries ±1, H Hᵀ = n I) spreads every channel over all channels with equal
weight, which is why QuaRot and LinearPatch rotate by one before scaling channels: outlier channels
stop dominating. Sylvester's construction gives only powers of two, but hidden sizes such as 576
(SmolLM2) = 36 x 16 or 640 (Gemma 3 270M) = 20 x 32 need a Paley factor:
- Paley I: order q + 1 for a prime q ≡ 3 (mod 4) (4, 8, 12, 20, 24, 32, 44, 48, 60, ...);
- Paley II: order 2(q + 1) for a prime q ≡ 1 (mod 4) (12, 28, 36, 60, 76, 108, ...).
The Kronecker product of Hadamard matrices is one.
"""

from __future__ import annotations

import torch

from .errors import LayerlabError


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i), the quadratic character modulo the prime q."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0] + [1 if k in squares else -1 for k in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]


def _paley(n: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order n, or None when n is not a Paley order."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + S, S skew with a border
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: symmetric C with blocks for 0 and ±1
        c = torch.zeros(n // 2, n // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, one) + torch.kron((c == 0).double(), zero)
    return None


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix H / sqrt(n) of order n, float64; a LayerlabError when none is built."""
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    sylvester, rest = torch.ones(1, 1, dtype=torch.float64), n
    while True:  # the largest power-of-two factor whose cofactor has a Paley matrix
        base = torch.ones(1, 1, dtype=torch.float64) if rest == 1 else _paley(rest)
        if base is not None:
            return torch.kron(base, sylvester) / n ** 0.5
        if rest % 2:
            break
        sylvester, rest = torch.kron(two, sylvester), rest // 2
    raise LayerlabError(f"no Hadamard matrix of order {n} (2^k times a Paley order) is known to layerlab; "
                        "use the 'diagonal' or 'full' patch form")
