"""UPSHead: the Unmasking Policy Stream, one logit h per token from the backbone's last hidden state.

    width > 0:  Linear(d, w) -> GELU -> Linear(w, 1)
    width == 0: Linear(d, 1)

sigmoid(h) is the probability that the token at the position is right and should be kept.
The head runs in its own dtype (float32 by default) whatever the backbone's, and returns float32.
"""
from __future__ import annotations

import torch
from torch import nn


class UPSHead(nn.Module):
    def __init__(self, hidden_size: int, width: int = 0) -> None:
        super().__init__()
        if hidden_size <= 0 or width < 0:
            raise ValueError(f"UPSHead needs hidden_size > 0 and width >= 0, got hidden_size={hidden_size}, "
                             f"width={width}")
        self.hidden_size = hidden_size
        self.width = width
        if width == 0:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, L, d) -> UPS logits h: (B, L) float32."""
        weight = self.net[0].weight
        return self.net(hidden.to(weight.dtype)).squeeze(-1).float()
