"""The shared machinery of dense anchor-free heads (FCOS and its successors): conv towers, points, decoding.

One prior per location and level: the point of :class:`~raydet.models.task_modules.prior_generators.
MlvlPointGenerator` (x, y) in input pixels (its offset and stride placement are the head's ``prior_generator``). The
layers are MMDetection's ``AnchorFreeHead``: a classification tower and a regression tower of ``stacked_convs`` x (3x3
conv [+ norm] + ReLU) on every level (weights shared across levels), then ``conv_cls`` (C sigmoid logits) and
``conv_reg`` (4 values) per location.

A subclass implements ``forward(feats)`` (per-level outputs; it may call :meth:`forward_single` for the towers) and
``loss(feats, batch)``. :meth:`predict` decodes ``forward``'s (cls_scores, bbox_preds[, score_factors]): bbox_preds
must be (l, t, r, b) distances in pixels at test time. Everything works on all points of all levels and images at
once; the only Python loops are over levels and, for NMS, images.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from raydet.models.head_configs import DetectionConfig
from raydet.models.norm import build_norm_layer
from raydet.models.postprocess import boxes_to_original, detection_nms
from raydet.models.task_modules.coders import DistancePointBBoxCoder
from raydet.models.task_modules.prior_generators import MlvlPointGenerator
from raydet.ops import DeformConv2d, ModulatedDeformConv2dPack

__all__ = ["AnchorFreeHead", "reduce_mean"]


def reduce_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over the DDP workers (``value`` itself without torch.distributed); MMDetection
    normalises FCOS's losses by the mean positive count of all workers."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return value
    value = value.clone()
    torch_dist.all_reduce(value.div_(torch_dist.get_world_size()), op=torch_dist.ReduceOp.SUM)
    return value


class AnchorFreeHead(nn.Module, ABC):
    """Base class: the conv towers and predictors, the points, and test-time decoding.

    Args:
        num_classes: foreground classes C.
        in_channels: channels of every input level.
        loss_cls, loss_bbox: built losses (sigmoid classification; the box loss compares decoded boxes).
        feat_channels: channels of the towers.
        stacked_convs: convs per tower.
        strides: stride of each level in pixels (one entry per input level).
        dcn_on_last_conv: the last conv of each tower is a modulated deformable conv (DCNv2, Zhu et al. 2019)
            instead of a plain 3x3 conv (FCOS's "DCN on the last conv of the towers" option).
        conv_bias: whether the tower convs have a bias; ``"auto"``: only without a norm (MMDetection).
        norm_cfg: the tower's norm layer (e.g. ``{type: GN, num_groups: 32}``) or None.
        bbox_coder: the (l, t, r, b) <-> box coder (default ``DistancePointBBoxCoder()``).
        prior_generator: a built :class:`MlvlPointGenerator` with the same ``strides`` (default: one with offset
            0.5, MMDetection's); torchvision's FCOS places its points with offset 0 and ``strides_from_input``.
        score_factor_mode: how a score factor (FCOS's centre-ness) enters the test-time score.
            ``"multiply"`` (MMDetection's ``BaseDenseHead``): ``score_thr`` and ``nms_pre`` select on
            sigmoid(cls), then the kept scores are multiplied by sigmoid(factor). ``"sqrt_multiply"``
            (torchvision's FCOS): the score is sqrt(sigmoid(cls) x sigmoid(factor)) and ``score_thr`` and
            ``nms_pre`` select on it.
        prior_prob: initial foreground probability of every location: ``conv_cls`` bias -log((1 - p) / p)
            (Lin et al. 2017, Sec. 4.1); every other conv weight starts N(0, 0.01), biases 0.
        test: test-time post-processing (``nms_pre`` per level, ``score_thr``, NMS, ``max_per_img``).

    Raises:
        ValueError: an empty or non-positive ``strides``, a loss without sigmoid outputs, a bad ``conv_bias`` or
            ``score_factor_mode``, or a ``prior_generator`` with other strides.
    """

    def __init__(self, num_classes: int, in_channels: int, loss_cls: nn.Module, loss_bbox: nn.Module,
                 feat_channels: int = 256, stacked_convs: int = 4, strides: list[int] = (4, 8, 16, 32, 64),
                 dcn_on_last_conv: bool = False, conv_bias: bool | Literal["auto"] = "auto",
                 norm_cfg: dict | None = None, bbox_coder: DistancePointBBoxCoder | None = None,
                 prior_generator: MlvlPointGenerator | None = None,
                 score_factor_mode: Literal["multiply", "sqrt_multiply"] = "multiply", prior_prob: float = 0.01,
                 test: DetectionConfig = DetectionConfig()):
        super().__init__()
        if not getattr(loss_cls, "use_sigmoid", True):
            raise ValueError("anchor-free heads classify with sigmoid outputs: set loss_cls.use_sigmoid: true")
        if len(strides) == 0 or any(not isinstance(s, int) or s <= 0 for s in strides):
            raise ValueError(f"strides must be positive integers, one per level, got {list(strides)}")
        if conv_bias != "auto" and not isinstance(conv_bias, bool):
            raise ValueError(f"conv_bias must be true, false or 'auto', got {conv_bias!r}")
        if score_factor_mode not in ("multiply", "sqrt_multiply"):
            raise ValueError(f"score_factor_mode must be 'multiply' or 'sqrt_multiply', got {score_factor_mode!r}")
        if prior_generator is not None and prior_generator.strides != [(int(s), int(s)) for s in strides]:
            raise ValueError(f"prior_generator strides {prior_generator.strides} differ from the head's strides "
                             f"{list(strides)}")
        if not 0 < prior_prob < 1:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.num_classes = num_classes
        self.cls_out_channels = num_classes
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.stacked_convs = stacked_convs
        self.strides = [int(s) for s in strides]
        self.dcn_on_last_conv = bool(dcn_on_last_conv)
        self.conv_bias = norm_cfg is None if conv_bias == "auto" else conv_bias
        self.norm_cfg = norm_cfg
        self.loss_cls = loss_cls
        self.loss_bbox = loss_bbox
        self.bbox_coder = bbox_coder if bbox_coder is not None else DistancePointBBoxCoder()
        self.prior_generator = prior_generator if prior_generator is not None else MlvlPointGenerator(self.strides)
        self.score_factor_mode = score_factor_mode
        self.prior_prob = float(prior_prob)
        self.test = test
        self._init_layers()
        self.init_weights()

    # ------------------------------------------------------------------------------------------------ layers
    def _tower(self) -> nn.Sequential:
        """``stacked_convs`` x (3x3 conv [+ norm] + ReLU), laid out as :func:`~raydet.models.layers.conv_tower`."""
        layers = []
        for i in range(self.stacked_convs):
            cin = self.in_channels if i == 0 else self.feat_channels
            if self.dcn_on_last_conv and i == self.stacked_convs - 1:
                conv = ModulatedDeformConv2dPack(cin, self.feat_channels, 3, padding=1, bias=self.conv_bias)
            else:
                conv = nn.Conv2d(cin, self.feat_channels, 3, padding=1, bias=self.conv_bias)
            layers.append(conv)
            if self.norm_cfg is not None:
                layers.append(build_norm_layer(self.norm_cfg, self.feat_channels))
            layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    def _init_layers(self) -> None:
        """Towers and predictors; a subclass adds its own layers after calling this."""
        self.cls_convs = self._tower()
        self.reg_convs = self._tower()
        self.conv_cls = nn.Conv2d(self.feat_channels, self.cls_out_channels, 3, padding=1)
        self.conv_reg = nn.Conv2d(self.feat_channels, 4, 3, padding=1)

    def init_weights(self) -> None:
        offsets = {id(m.conv_offset) for m in self.modules() if isinstance(m, DeformConv2d)}
        for m in self.modules():
            if isinstance(m, DeformConv2d) or (isinstance(m, nn.Conv2d) and id(m) not in offsets):
                nn.init.normal_(m.weight, std=0.01)  # DCN offset convs keep their zero init (Dai et al. 2017)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - self.prior_prob) / self.prior_prob))

    # ------------------------------------------------------------------------------------------------ forward
    def forward_single(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One level (B, C_in, H, W) -> cls_score (B, C, H, W), bbox_pred (B, 4, H, W) and the towers' outputs
        cls_feat, reg_feat (B, feat_channels, H, W)."""
        cls_feat = self.cls_convs(x)
        reg_feat = self.reg_convs(x)
        return self.conv_cls(cls_feat), self.conv_reg(reg_feat), cls_feat, reg_feat

    @abstractmethod
    def forward(self, feats: tuple[Tensor, ...]) -> tuple[list[Tensor], ...]:
        """Per-level features -> (cls_scores, bbox_preds[, score_factors]), each a list over levels."""

    def _check_levels(self, feats) -> None:
        if len(feats) != len(self.strides):
            raise ValueError(f"{type(self).__name__} got {len(feats)} feature levels for {len(self.strides)} "
                             f"strides {self.strides}")

    def points(self, maps: list[Tensor], with_stride: bool = False,
               img_metas: list[dict] | None = None) -> list[Tensor]:
        """The points of every level (h_l * w_l, 2) (x, y), or (., 4) with the strides, for per-level maps
        (B, ., h_l, w_l). ``img_metas`` give the padded batch size (``batch_input_shape``) to a prior generator
        with ``strides_from_input``."""
        sizes = [tuple(int(s) for s in m.shape[-2:]) for m in maps]
        input_shape = None
        if img_metas and "batch_input_shape" in img_metas[0]:
            input_shape = tuple(img_metas[0]["batch_input_shape"])
        return self.prior_generator.grid_priors(sizes, device=maps[0].device, dtype=torch.float32,
                                                with_stride=with_stride, input_shape=input_shape)

    # ------------------------------------------------------------------------------------------------ training
    @abstractmethod
    def loss(self, feats: tuple[Tensor, ...], batch: dict) -> dict[str, Tensor]:
        """Named losses over all points of the batch (``batch`` as :mod:`raydet.structures`)."""

    # ------------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, feats: tuple[Tensor, ...], img_metas: list[dict]) -> list[dict]:
        """Detections per image in original-image pixels: boxes (m, 4), scores (m,), labels (m,)."""
        return self.predict_by_feat(*self(feats), img_metas=img_metas)

    @torch.no_grad()
    def predict_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor],
                        score_factors: list[Tensor] | None = None, img_metas: list[dict] | None = None) -> list[dict]:
        """Decode per-level outputs (MMDetection's ``BaseDenseHead.predict_by_feat``).

        Args:
            cls_scores: per level (B, C, H, W) logits. bbox_preds: per level (B, 4, H, W) distances in pixels.
            score_factors: per level (B, 1, H, W) logits (e.g. FCOS's centre-ness) or None.
            img_metas: per image, ``img_shape`` (boxes are clipped to it) and what ``boxes_to_original`` reads.

        On each level and image: the (point, class) pairs with sigmoid score > ``score_thr``, at most ``nms_pre``
        of the highest; with score factors, each kept score is then multiplied by its point's sigmoid factor
        (``score_factor_mode`` "sqrt_multiply": the score is sqrt(sigmoid(cls) x sigmoid(factor)) from the start).
        Then class-wise NMS and the ``max_per_img`` best.
        """
        cfg = self.test
        num_images = cls_scores[0].shape[0]
        points = self.points(cls_scores, img_metas=img_metas)
        joint = score_factors is not None and self.score_factor_mode == "sqrt_multiply"
        per_image = [([], [], [], []) for _ in range(num_images)]  # boxes, scores, labels, factors
        for level, (cls, reg, pts) in enumerate(zip(cls_scores, bbox_preds, points)):
            scores = cls.permute(0, 2, 3, 1).reshape(num_images, -1).float().sigmoid()  # (B, HW * C)
            if joint:  # (B, HW, C) x (B, HW, 1) -> flattened (B, HW * C)
                factor = score_factors[level].permute(0, 2, 3, 1).reshape(num_images, -1, 1).float().sigmoid()
                scores = (scores.view(num_images, -1, self.cls_out_channels) * factor).sqrt().flatten(1)
            k = scores.shape[1] if cfg.nms_pre <= 0 else min(cfg.nms_pre, scores.shape[1])
            # the top k of the scores above the threshold, sorted, for all images at once
            top, idx = scores.masked_fill(scores <= cfg.score_thr, -math.inf).topk(k, dim=1)
            point_idx, labels = idx // self.cls_out_channels, idx % self.cls_out_channels
            dists = reg.permute(0, 2, 3, 1).reshape(num_images, -1, 4).float()
            dists = dists.gather(1, point_idx[..., None].expand(-1, -1, 4))
            factors = None
            if score_factors is not None and not joint:
                factors = score_factors[level].permute(0, 2, 3, 1).reshape(num_images, -1).float().sigmoid()
                factors = factors.gather(1, point_idx)
            for i, meta in enumerate(img_metas):
                keep = top[i] > -math.inf
                boxes = self.bbox_coder.decode(pts[point_idx[i, keep]], dists[i, keep],
                                               max_shape=meta["img_shape"][:2])
                out = per_image[i]
                out[0].append(boxes)
                out[1].append(top[i, keep])
                out[2].append(labels[i, keep])
                if factors is not None:
                    out[3].append(factors[i, keep])
        results = []
        for (boxes_l, scores_l, labels_l, factors_l), meta in zip(per_image, img_metas):
            boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
            if factors_l:
                scores = scores * torch.cat(factors_l)
            if cfg.min_bbox_size > 0:  # keep w >= min and h >= min (as RetinaHead)
                large = ((boxes[:, 2:] - boxes[:, :2]) >= cfg.min_bbox_size).all(dim=1)
                boxes, scores, labels = boxes[large], scores[large], labels[large]
            keep, scores = detection_nms(boxes, scores, labels, cfg)
            results.append({"boxes": boxes_to_original(boxes[keep], meta), "scores": scores,
                            "labels": labels[keep]})
        return results
