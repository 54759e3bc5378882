"""The RoI stage of two-stage detectors (MMDetection's ``roi_heads``): RoI heads that run it, and their parts in
``bbox_heads/``, ``mask_heads/`` and ``roi_extractors/``."""
