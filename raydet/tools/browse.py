"""``raydet browse``: draw a split's images as the model sees them (MMDetection's ``browse_dataset.py``).

Each image goes through what training does to it, in process: the dataset's decoder, the split's per-image
transforms (``Resize``, ``RandomFlip``, ...) with the training random generator of ``(seed, epoch, image id)``
(:func:`raydet.data.pipeline.image_rng`), then the batch step's padding to ``Pad.size_divisor``. The padded area is
filled with the ``Normalize`` mean, the colour that normalises to the zeros the model gets there (black without a
``Normalize``). Boxes, ignored (crowd / difficult) boxes, masks and class names are drawn on top
(:func:`raydet.tools.draw.draw_instances`) and each image is written as a PNG.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from raydet.data.pipeline import build_transforms, load_sample
from raydet.data.transforms import CollateConfig
from raydet.masks import instance_masks_to_bitmaps

from .draw import draw_instances

__all__ = ["pad_color", "render_sample", "browse_dataset"]


def pad_color(cfg: CollateConfig) -> tuple[int, int, int]:
    """The RGB colour that the batch step's normalisation maps to 0: the ``Normalize`` mean (reversed when
    ``to_rgb`` is false: the mean is then in BGR order), rounded and clipped to 0..255."""
    mean = tuple(cfg.mean) if cfg.to_rgb else tuple(cfg.mean)[::-1]
    return tuple(int(np.clip(round(float(v)), 0, 255)) for v in mean)


def render_sample(sample: dict, collate_cfg: CollateConfig, class_names: list[str]) -> np.ndarray:
    """A transformed sample (see raydet.data.transforms) -> uint8 RGB drawing of the padded input.

    The image sits at the top left of an (h, w) rounded up to ``size_divisor`` canvas of :func:`pad_color`;
    ``boxes`` / ``labels``, ``ignore_boxes`` and ``masks`` (when the sample has them) are drawn in image pixels.
    """
    image = np.asarray(sample["image"], np.uint8)
    h, w = image.shape[:2]
    d = max(1, int(collate_cfg.size_divisor))
    canvas = np.empty((-(-h // d) * d, -(-w // d) * d, 3), np.uint8)  # raydet.structures.pad_to_divisor (no torch)
    canvas[:] = pad_color(collate_cfg)
    canvas[:h, :w] = image
    masks = None
    if sample.get("masks") is not None:
        bitmaps = instance_masks_to_bitmaps(sample["masks"], h, w)
        masks = np.zeros((len(bitmaps),) + canvas.shape[:2], bool)
        masks[:, :h, :w] = bitmaps.astype(bool)
    return draw_instances(canvas, sample["boxes"], sample["labels"], list(class_names), masks=masks,
                          ignore_boxes=sample.get("ignore_boxes"))


def _png_names(records: list[dict]) -> list[str]:
    """``<file stem>.png`` per record (``image_<id>.png`` without a file name); ``<stem>_<id>.png`` where stems
    clash."""
    stems = [Path(str(r.get("file_name") or f"image_{r['image_id']}")).stem for r in records]
    clash = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{r['image_id']}.png" if s in clash else f"{s}.png" for s, r in zip(stems, records)]


def browse_dataset(dataset, out_dir: str, *, num: int | None = None, seed: int = 0, epoch: int = 0) -> list[str]:
    """Draw the first ``num`` (default all) images of ``dataset`` as the model sees them into ``out_dir``.

    ``seed`` / ``epoch``: the pipeline's ``seed`` and the 0-based training epoch whose random draws to show.
    Returns the PNG paths, in record order. An image that cannot be decoded raises its reader's error.
    """
    if num is not None and num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    transforms, collate_cfg = build_transforms(dataset.pipeline)
    loader = dataset.image_loader()
    with_masks = bool(getattr(dataset, "with_masks", False))
    records = dataset.records[:num] if num is not None else list(dataset.records)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for record, name in zip(records, _png_names(records)):
        sample = load_sample(loader, record, transforms, seed=seed, epoch=epoch, with_masks=with_masks)
        drawing = render_sample(sample, collate_cfg, list(dataset.classes))
        path = os.path.join(out_dir, name)
        if not cv2.imwrite(path, cv2.cvtColor(drawing, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")
        paths.append(path)
    return paths
