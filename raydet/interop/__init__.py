"""Checkpoints of other toolboxes as raydet checkpoints (``raydet convert``).

One module per source format (:mod:`~raydet.interop.torchvision`, :mod:`~raydet.interop.mmdet`,
:mod:`~raydet.interop.detectron2`), a shared record of
what happened to each source tensor (:mod:`raydet.interop.report`) and the command's function
(:func:`convert_checkpoint`). Plain PyTorch, no Ray.
"""
from raydet.interop.convert import SOURCE_FORMATS, convert_checkpoint, convert_state_dict, load_source_state
from raydet.interop.report import ConversionError, ConversionReport

__all__ = ["SOURCE_FORMATS", "convert_checkpoint", "convert_state_dict", "load_source_state", "ConversionError",
           "ConversionReport"]
