"""Learnable feature maps phi, one set of weights per attention head.

The math is in ``attention_math.py``; these modules own the parameters and their initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_math import based_features, hedgehog_features


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W + b), softmax(-(x W + b))] per head; W starts as the identity, b at 0.

    Maps [B, H, T, head_dim] to [B, H, T, 2 * feature_dim].
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        feature_dim = feature_dim or head_dim
        eye = torch.eye(head_dim, feature_dim)
        self.weight = nn.Parameter(eye.expand(num_heads, -1, -1).clone())
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_dim))
        self.output_dim = 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in the weights' dtype (fp32 masters): a peaky softmax underflows in bf16.
        return hedgehog_features(x.to(self.weight.dtype), self.weight, self.bias)


class BasedFeatureMap(nn.Module):
    """A learned projection to ``feature_dim`` (16) followed by the 2nd-order Taylor map.

    The projection starts as orthonormal columns scaled by (head_dim / feature_dim)^(1/4), so that
    s = q'.k' / sqrt(feature_dim) matches the teacher's q.k / sqrt(head_dim) in expectation over
    the random subspace. Maps [B, H, T, head_dim] to [B, H, T, 1 + f + f(f+1)/2] (153 for f = 16).
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        feature_dim = feature_dim or 16
        projection = torch.empty(num_heads, head_dim, feature_dim)
        for head in range(num_heads):
            nn.init.orthogonal_(projection[head])
        self.projection = nn.Parameter(projection * (head_dim / feature_dim) ** 0.25)
        self.output_dim = 1 + feature_dim + feature_dim * (feature_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return based_features(x.to(self.projection.dtype), self.projection)


FEATURE_MAPS: dict[str, type[nn.Module]] = {"hedgehog": HedgehogFeatureMap, "based": BasedFeatureMap}
