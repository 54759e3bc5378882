"""Dataset and result tools (MMDetection's ``tools/analysis_tools`` scripts), in process, without Ray.

* :mod:`~raydet.tools.browse`: ``raydet browse`` draws a split's images as the model sees them (after the per-image
  transforms, padded as the batch is), with boxes, masks and class names.
* :mod:`~raydet.tools.check_data`: ``raydet check-data`` reads every split, decodes every image, and reports counts,
  box sizes and problems.
* :mod:`~raydet.tools.analyze`: ``raydet analyze`` scores a COCO results json: per-class AP, the confusion matrix
  (:mod:`~raydet.tools.confusion`) and the COCO error breakdown (:mod:`~raydet.tools.coco_errors`).
* :mod:`~raydet.tools.draw`: the drawing shared by them.
"""
