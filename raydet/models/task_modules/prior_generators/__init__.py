"""Prior generators: the anchors (or points) of every feature level, in input-image pixels."""
from raydet.models.task_modules.prior_generators.anchor_generator import AnchorGenerator, anchor_inside_flags
from raydet.models.task_modules.prior_generators.point_generator import MlvlPointGenerator
from raydet.models.task_modules.prior_generators.ssd_anchor_generator import SSDAnchorGenerator

__all__ = ["AnchorGenerator", "anchor_inside_flags", "MlvlPointGenerator", "SSDAnchorGenerator"]
