"""GA-RetinaNet head (Wang et al. 2019, Sec. 4): RetinaNet's conv towers with guided anchors."""
from __future__ import annotations

from torch import nn

from raydet.models.dense_heads.guided_anchor_head import FeatureAdaption, GuidedAnchorHead, bias_for_prob
from raydet.models.head_configs import DetectionConfig
from raydet.models.layers import conv_tower
from raydet.registry import register

__all__ = ["GARetinaHead"]


@register
class GARetinaHead(GuidedAnchorHead):
    """Per level: the classification and regression towers (``stacked_convs`` x 3x3 conv [+ norm] + ReLU); anchor
    location (1x1 conv on the classification tower) and shape (1x1 conv on the regression tower); a feature adaption
    of each tower; then 3x3 convs to C class logits and 4 deltas per location (MMDetection's ``GARetinaHead``).

    The class and location logits start at probability 0.01. Other arguments: see
    :class:`~raydet.models.dense_heads.guided_anchor_head.GuidedAnchorHead`.
    """

    def __init__(self, num_classes: int, in_channels: int, approx_anchor_generator, square_anchor_generator,
                 anchor_coder, bbox_coder, loss_loc, loss_shape, loss_cls, loss_bbox, assigner, ga_assigner,
                 sampler=None, ga_sampler=None, feat_channels: int = 256, stacked_convs: int = 4,
                 norm_cfg: dict | None = None, deform_groups: int = 4, loc_filter_thr: float = 0.01,
                 center_ratio: float = 0.2, ignore_ratio: float = 0.5, allowed_border: float = -1,
                 pos_weight: float = -1, test: DetectionConfig = DetectionConfig()):
        self.stacked_convs = stacked_convs
        self.norm_cfg = norm_cfg
        super().__init__(num_classes, in_channels, approx_anchor_generator, square_anchor_generator, anchor_coder,
                         bbox_coder, loss_loc, loss_shape, loss_cls, loss_bbox, assigner, ga_assigner, sampler,
                         ga_sampler, feat_channels=feat_channels, deform_groups=deform_groups,
                         loc_filter_thr=loc_filter_thr, center_ratio=center_ratio, ignore_ratio=ignore_ratio,
                         allowed_border=allowed_border, pos_weight=pos_weight, test=test)

    def _init_layers(self) -> None:
        c = self.feat_channels
        self.cls_convs = conv_tower(self.in_channels, c, self.stacked_convs, self.norm_cfg)
        self.reg_convs = conv_tower(self.in_channels, c, self.stacked_convs, self.norm_cfg)
        self.conv_loc = nn.Conv2d(c, 1, 1)
        self.conv_shape = nn.Conv2d(c, 2, 1)
        self.feature_adaption_cls = FeatureAdaption(c, c, 3, self.deform_groups)
        self.feature_adaption_reg = FeatureAdaption(c, c, 3, self.deform_groups)
        self.retina_cls = nn.Conv2d(c, self.cls_out_channels, 3, padding=1)
        self.retina_reg = nn.Conv2d(c, 4, 3, padding=1)

    def _init_weights(self) -> None:
        super()._init_weights()
        nn.init.constant_(self.retina_cls.bias, bias_for_prob(0.01))

    def forward_single(self, x):
        cls_feat = self.cls_convs(x)
        reg_feat = self.reg_convs(x)
        loc_pred = self.conv_loc(cls_feat)
        shape_pred = self.conv_shape(reg_feat)
        cls_feat = self.feature_adaption_cls(cls_feat, shape_pred)
        reg_feat = self.feature_adaption_reg(reg_feat, shape_pred)
        return self.retina_cls(cls_feat), self.retina_reg(reg_feat), shape_pred, loc_pred
