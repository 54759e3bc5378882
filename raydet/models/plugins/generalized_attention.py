"""Generalized spatial attention (Zhu et al. 2019, "An Empirical Study of Spatial Attention Mechanisms in Deep
Networks", 2019: its generalized attention formulation and the four terms it ablates)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raydet.registry import register

__all__ = ["GeneralizedAttention"]

_WAVE_LENGTH = 1000.0  # the sinusoids' base (Relation Networks' position embedding; mmcv's wave_length)


@register
class GeneralizedAttention(nn.Module):
    """Self-attention over the positions of a feature map whose attention logits are a sum of up to four terms.

    For a query at q and a key at k (per head m, with content embeddings ``z_q`` = W_q x_q and ``x_k`` = W_k x_k,
    and a relative-position embedding ``R_{k-q}``), the logit is the sum of the terms flagged in
    ``attention_type`` (the paper's terms E1-E4):

    ========  =============================  =========================
    bit       term                           logit
    ========  =============================  =========================
    ``1000``  query and key content          ``z_q . x_k``
    ``0100``  query content, relative pos.   ``z_q . (Wx R^x + Wy R^y)``
    ``0010``  key content only (saliency)    ``u_m . x_k``
    ``0001``  relative position only         ``v_m . (Wx R^x + Wy R^y)``
    ========  =============================  =========================

    ``R^x``, ``R^y`` are sinusoidal embeddings (``position_embedding_dim / 2`` values each: sin and cos at
    ``D / 4`` wavelengths ``1000^(4 i / D)``) of the horizontal and vertical offsets between query and key in input
    pixels times ``position_magnitude``; ``Wx`` / ``Wy`` (``appr_geom_fc_x`` / ``_y``) project them per head and the
    sum is divided by sqrt(2). ``u_m`` / ``v_m`` are learnt vectors (``appr_bias`` / ``geom_bias``). The logits are
    not scaled by 1/sqrt(d) (mmcv's form). The softmax over keys weights the values (W_v x_k), the heads are
    concatenated and projected (``proj_conv``), and ``y = x + gamma * out`` with ``gamma`` a learnt scalar starting
    at 0, so the block starts as the identity.

    Args:
        in_channels: C of the input (B, C, H, W); each of the ``num_heads`` heads has ``C // num_heads`` channels.
        spatial_range: -1 attends to every position; r >= 0 only to keys within r input pixels of the query along
            each axis (query at y * q_stride, key at y' * kv_stride). r must be >= kv_stride - 1 so that every
            query keeps a key. (mmcv's map of allowed keys differs by one key at the far end and is limited to
            84 x 84 maps; its ``local_constraint_map`` tensor is not kept here: the mask is computed per input.)
        num_heads: attention heads.
        position_embedding_dim: D, the length of the two position embeddings together (-1: C); a multiple of 4.
        position_magnitude: multiplies the pixel offsets before the embedding.
        kv_stride: keys and values are taken at every kv_stride-th row and column (MMDetection's configs: 2, to
            save computation).
        q_stride: queries likewise; the output is upsampled bilinearly back to H x W.
        attention_type: four '0'/'1' characters selecting the terms above, e.g. ``"1111"`` (all) or ``"0010"`` (key
            content only: the attention is the same for every query, computed once).

    Layers carry mmcv's names (``query_conv``, ``key_conv``, ``value_conv``, ``appr_geom_fc_x``/``_y``,
    ``appr_bias``, ``geom_bias``, ``proj_conv``, ``gamma``), each present only when a selected term needs it, so
    MMDetection's checkpoints load unchanged. Initialisation as mmcv's: the convs and position projections Kaiming-
    uniform (fan_in, a = 1) with zero bias, ``appr_bias`` / ``geom_bias`` uniform in +-1/sqrt(2 d), ``gamma`` 0.

    ``forward(x)``: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: a malformed ``attention_type``, fewer channels than heads, a stride below 1, a
            ``position_embedding_dim`` that is not a multiple of 4, or a ``spatial_range`` below kv_stride - 1.
    """

    _abbr_ = "gen_attention_block"  # the module name a ResNet block gives it (MMDetection's plugin naming)

    def __init__(self, in_channels: int, spatial_range: int = -1, num_heads: int = 9,
                 position_embedding_dim: int = -1, position_magnitude: float = 1, kv_stride: int = 2,
                 q_stride: int = 1, attention_type: str = "1111"):
        super().__init__()
        if not (isinstance(attention_type, str) and len(attention_type) == 4 and set(attention_type) <= {"0", "1"}
                and "1" in attention_type):
            raise ValueError(f"GeneralizedAttention attention_type must be four '0'/'1' characters with at least one "
                             f"'1' (e.g. '1111', '0010'), got {attention_type!r}")
        if num_heads < 1 or in_channels < num_heads:
            raise ValueError(f"GeneralizedAttention needs 1 <= num_heads <= in_channels, got num_heads={num_heads}, "
                             f"in_channels={in_channels}")
        if kv_stride < 1 or q_stride < 1:
            raise ValueError(f"GeneralizedAttention kv_stride and q_stride must be >= 1, got {kv_stride}, {q_stride}")
        if spatial_range >= 0 and spatial_range < kv_stride - 1:
            raise ValueError(f"GeneralizedAttention spatial_range {spatial_range} < kv_stride - 1 = {kv_stride - 1} "
                             f"leaves some queries without a key")
        self.terms = tuple(c == "1" for c in attention_type)
        self.attention_type = attention_type
        self.in_channels, self.num_heads = in_channels, num_heads
        self.spatial_range, self.position_magnitude = spatial_range, position_magnitude
        self.kv_stride, self.q_stride = kv_stride, q_stride
        self.position_embedding_dim = position_embedding_dim if position_embedding_dim > 0 else in_channels
        if (self.terms[1] or self.terms[3]) and self.position_embedding_dim % 4:
            raise ValueError(f"GeneralizedAttention position_embedding_dim must be a multiple of 4 (sin and cos per "
                             f"axis), got {self.position_embedding_dim}")
        self.qk_embed_dim = self.v_dim = in_channels // num_heads
        out_c = self.qk_embed_dim * num_heads
        conv = lambda c_in, c_out, bias=False: nn.Conv2d(c_in, c_out, 1, bias=bias)  # noqa: E731
        if self.terms[0] or self.terms[1]:
            self.query_conv = conv(in_channels, out_c)
        if self.terms[0] or self.terms[2]:
            self.key_conv = conv(in_channels, out_c)
        self.value_conv = conv(in_channels, self.v_dim * num_heads)
        if self.terms[1] or self.terms[3]:
            self.appr_geom_fc_x = nn.Linear(self.position_embedding_dim // 2, out_c, bias=False)
            self.appr_geom_fc_y = nn.Linear(self.position_embedding_dim // 2, out_c, bias=False)
        if self.terms[2]:
            self.appr_bias = nn.Parameter(torch.empty(out_c))
        if self.terms[3]:
            self.geom_bias = nn.Parameter(torch.empty(out_c))
        self.proj_conv = conv(self.v_dim * num_heads, in_channels, bias=True)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.init_weights()

    def init_weights(self) -> None:
        for name in ("query_conv", "key_conv", "value_conv", "appr_geom_fc_x", "appr_geom_fc_y", "proj_conv"):
            layer = getattr(self, name, None)
            if layer is not None:
                nn.init.kaiming_uniform_(layer.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        stdv = 1.0 / math.sqrt(self.qk_embed_dim * 2)
        for name in ("appr_bias", "geom_bias"):
            if hasattr(self, name):
                nn.init.uniform_(getattr(self, name), -stdv, stdv)
        nn.init.zeros_(self.gamma)

    def _position_features(self, n_q: int, n_kv: int, fc: nn.Linear) -> torch.Tensor:
        """(heads, n_q, n_kv, d): the projected embedding of the offsets q * q_stride - k * kv_stride along one
        axis, divided by sqrt(2)."""
        device = fc.weight.device
        q = torch.arange(n_q, device=device, dtype=torch.float32) * self.q_stride
        k = torch.arange(n_kv, device=device, dtype=torch.float32) * self.kv_stride
        offset = (q[:, None] - k[None, :]) * self.position_magnitude                     # (n_q, n_kv)
        quarter = self.position_embedding_dim // 4
        wavelengths = _WAVE_LENGTH ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
        angles = offset[..., None] / wavelengths                                           # (n_q, n_kv, D/4)
        embedding = torch.cat((angles.sin(), angles.cos()), dim=-1).to(fc.weight.dtype)   # (n_q, n_kv, D/2)
        feats = fc(embedding).view(n_q, n_kv, self.num_heads, self.qk_embed_dim) / math.sqrt(2)
        return feats.permute(2, 0, 1, 3)

    def _energy(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        """The summed logits, (B or 1, heads, h or 1, w or 1, h_kv, w_kv): a query axis of size 1 where no selected
        term depends on the query's content or position (``"0010"``)."""
        heads, d = self.num_heads, self.qk_embed_dim
        n, _, h, w = x_q.shape
        h_kv, w_kv = x_kv.shape[2:]
        use_query = self.terms[0] or self.terms[1]
        query = self.query_conv(x_q).view(n, heads, d, h, w).permute(0, 1, 3, 4, 2) if use_query else None
        key = self.key_conv(x_kv).view(n, heads, d, h_kv * w_kv) if self.terms[0] or self.terms[2] else None
        terms = []
        # content terms: (z_q + u) . x_k, each part where selected
        if self.terms[0]:
            terms.append((query.reshape(n, heads, h * w, d) @ key).view(n, heads, h, w, h_kv, w_kv))
        if self.terms[2]:
            terms.append((self.appr_bias.view(1, heads, 1, d) @ key).view(n, heads, 1, 1, h_kv, w_kv))
        # position terms: (z_q + v) . (Wx R^x + Wy R^y)
        if self.terms[1] or self.terms[3]:
            pos_x = self._position_features(w, w_kv, self.appr_geom_fc_x)              # (heads, w, w_kv, d)
            pos_y = self._position_features(h, h_kv, self.appr_geom_fc_y)              # (heads, h, h_kv, d)
            if self.terms[1]:
                e_x = torch.einsum("nmyxd,mxkd->nmyxk", query, pos_x)                 # (n, heads, h, w, w_kv)
                e_y = torch.einsum("nmyxd,mykd->nmyxk", query, pos_y)                 # (n, heads, h, w, h_kv)
                terms.append(e_x[:, :, :, :, None, :] + e_y[:, :, :, :, :, None])
            if self.terms[3]:
                geom = self.geom_bias.view(heads, d)
                e_x = torch.einsum("md,mxkd->mxk", geom, pos_x)                       # (heads, w, w_kv)
                e_y = torch.einsum("md,mykd->myk", geom, pos_y)                       # (heads, h, h_kv)
                terms.append(e_x[None, :, None, :, None, :] + e_y[None, :, :, None, :, None])
        energy = terms[0]
        for term in terms[1:]:
            energy = energy + term
        return energy

    def _local_mask(self, h: int, w: int, h_kv: int, w_kv: int, device) -> torch.Tensor:
        """(h, w, h_kv, w_kv) True where the key is farther than spatial_range input pixels along an axis."""
        def far(n_q, n_kv):
            q = torch.arange(n_q, device=device) * self.q_stride
            k = torch.arange(n_kv, device=device) * self.kv_stride
            return (q[:, None] - k[None, :]).abs() > self.spatial_range
        return far(h, h_kv)[:, None, :, None] | far(w, w_kv)[None, :, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = x[:, :, ::self.q_stride, ::self.q_stride] if self.q_stride > 1 else x
        x_kv = x[:, :, ::self.kv_stride, ::self.kv_stride] if self.kv_stride > 1 else x
        n, _, h, w = x_q.shape
        h_kv, w_kv = x_kv.shape[2:]
        energy = self._energy(x_q, x_kv)
        if self.spatial_range >= 0:
            mask = self._local_mask(h, w, h_kv, w_kv, x.device)
            energy = energy.expand(-1, -1, h, w, -1, -1).masked_fill(mask, float("-inf"))
        b, heads, qh, qw = energy.shape[:4]
        # softmax over the keys in float32 (bfloat16 / float16 logits under autocast)
        attention = energy.reshape(b, heads, qh * qw, h_kv * w_kv).float().softmax(dim=-1)
        value = self.value_conv(x_kv).view(n, heads, self.v_dim, h_kv * w_kv).transpose(2, 3)
        out = attention.to(value.dtype) @ value                                       # (n, heads, qh * qw, v_dim)
        out = self.proj_conv(out.transpose(2, 3).reshape(n, heads * self.v_dim, qh, qw))
        if (qh, qw) != (1, 1) and (qh, qw) != tuple(x.shape[2:]):
            out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
        return x + self.gamma * out

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, attention_type={self.attention_type!r}, num_heads={self.num_heads}, "
                f"kv_stride={self.kv_stride}, q_stride={self.q_stride}, spatial_range={self.spatial_range}")
