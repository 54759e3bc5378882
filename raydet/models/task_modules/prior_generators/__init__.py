"""Prior generators: the anchors (or points) of every feature level, in input-image pixels."""
from raydet.models.task_modules.prior_generators.anchor_generator import AnchorGenerator, anchor_inside_flags

__all__ = ["AnchorGenerator", "anchor_inside_flags"]
