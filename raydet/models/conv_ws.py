"""Weight Standardization (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", Sec. 3): a conv whose weight is standardised per output channel before every forward.

For output channel o with the C_in x kh x kw weights W_o (flattened, n = C_in / groups x kh x kw values)::

    W_hat_o = (W_o - mean(W_o)) / (std(W_o) + eps)

with ``std`` the unbiased (n - 1) standard deviation and ``eps`` = 1e-5, as mmcv's ``ConvWS2d`` / ``conv_ws_2d``
(registered there as ``ConvWS``). The stored parameter is the raw ``weight`` (standardised on the fly), so the
state-dict keys and shapes are those of ``nn.Conv2d`` and checkpoints of either convert unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvWS", "standardize_weight"]


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(C_out, C_in / groups, kh, kw) -> the same shape, each output channel minus its mean, divided by its
    unbiased std + ``eps``. Computed in float32 (a bf16 / fp16 weight would lose the small differences) and returned
    in the weight's dtype."""
    flat = weight.flatten(1)
    if flat.dtype != torch.float32 and flat.dtype != torch.float64:
        flat = flat.float()
    var, mean = torch.var_mean(flat, dim=1, keepdim=True)  # one pass; unbiased (correction 1), as torch.std
    return ((flat - mean) / (var.sqrt() + eps)).view_as(weight).to(weight.dtype)


class ConvWS(nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (mmcv's ``ConvWS2d``); same arguments plus ``eps`` (default 1e-5,
    mmcv's). ``forward(x)``: (B, C_in, H, W) -> (B, C_out, H', W') as ``F.conv2d`` with :func:`standardize_weight`
    of ``weight``; the bias (if any) is added unchanged.

    Raises:
        ValueError: ``eps`` not > 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, eps: float = 1e-5, **kwargs):
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise ValueError(f"ConvWS eps must be a number > 0, got {eps!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, **kwargs)
        self.eps = float(eps)

    def standardized_weight(self) -> torch.Tensor:
        """The weight this conv applies: :func:`standardize_weight` of ``self.weight``."""
        return standardize_weight(self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode),
                            self.standardized_weight(), self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
