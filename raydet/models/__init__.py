"""Model components. Importing this package registers every component type with ``raydet.registry``."""
from raydet.models import losses  # noqa: F401
from raydet.models.task_modules import assigners, coders, prior_generators, samplers  # noqa: F401
from raydet.models.backbones import resnet  # noqa: F401
from raydet.models.necks import fpn  # noqa: F401
from raydet.models.backbones import hrnet  # noqa: F401
from raydet.models.necks import hrfpn  # noqa: F401
from raydet.models.dense_heads import rpn_head, retina_head  # noqa: F401
from raydet.models.dense_heads import fsaf_head  # noqa: F401
from raydet.models.roi_heads import bbox_heads, mask_heads, roi_extractors, standard_roi_head  # noqa: F401
from raydet.models.detectors import detectors  # noqa: F401
from raydet.models.dense_heads import guided_anchor_head, ga_retina_head, ga_rpn_head  # noqa: F401
from raydet.models.detectors import fsaf  # noqa: F401
from raydet.models.dense_heads import fcos_head  # noqa: F401
from raydet.models.detectors import fcos  # noqa: F401
from raydet.models.backbones import ssd_vgg  # noqa: F401
from raydet.models.backbones import root_resnet  # noqa: F401
from raydet.models.necks import ssd_neck  # noqa: F401
from raydet.models.necks import mlfpn  # noqa: F401
from raydet.models.dense_heads import ssd_head  # noqa: F401
from raydet.models.detectors import ssd  # noqa: F401
from raydet.models.detectors import fast_rcnn  # noqa: F401
from raydet.models.roi_heads import cascade_roi_head  # noqa: F401
from raydet.models.detectors import cascade_rcnn  # noqa: F401
from raydet.models.roi_heads import htc_roi_head  # noqa: F401
from raydet.models.detectors import htc  # noqa: F401
from raydet.models.roi_heads import double_roi_head, grid_roi_head  # noqa: F401
from raydet.models.detectors import grid_rcnn  # noqa: F401
from raydet.models.roi_heads import mask_scoring_roi_head, rfcn_roi_head  # noqa: F401
from raydet.models.detectors import mask_scoring_rcnn, rfcn  # noqa: F401
import raydet.ops  # noqa: F401  (registers the deformable conv modules)


def build_model(cfg: dict, path: str = "model"):
    """Build a detector from its config dict (the pipeline's ``model`` section)."""
    from raydet.registry import build

    return build(cfg, path)
