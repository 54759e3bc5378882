"""Turn (image, record) samples into a model batch (see raydet.structures), in plain PyTorch."""
from __future__ import annotations

import numpy as np
import torch

from raydet.structures import IMAGENET_MEAN, IMAGENET_STD, collate_images, image_to_tensor, pad_to_divisor

__all__ = ["collate_samples"]


def collate_samples(samples, size_divisor: int = 32, with_masks: bool = False, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD) -> dict:
    """Batch already-resized samples.

    Args:
        samples: list of ``(image HxWx3 uint8 RGB, record)``; each record may also carry ``ori_shape``,
            ``scale_factor`` (sx, sy) and ``flip`` when the image was resized / flipped (defaults: identity).
        with_masks: rasterise ``record["masks"]`` to (n, h, w) uint8 bitmaps as ``gt_masks``.
    """
    images, metas, boxes, labels, ignores, masks = [], [], [], [], [], []
    for image, rec in samples:
        h, w = image.shape[:2]
        images.append(image_to_tensor(image, mean, std))
        ignore = np.asarray(rec.get("ignore", np.zeros(len(rec["labels"]), bool)), dtype=bool)
        rec_boxes = np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4)
        boxes.append(torch.from_numpy(rec_boxes[~ignore]))
        labels.append(torch.from_numpy(np.asarray(rec["labels"], dtype=np.int64)[~ignore]))
        ignores.append(torch.from_numpy(rec_boxes[ignore]))
        metas.append({
            "image_id": int(rec.get("image_id", len(metas))),
            "ori_shape": tuple(rec.get("ori_shape", (h, w))),
            "img_shape": (h, w),
            "scale_factor": tuple(rec.get("scale_factor", (1.0, 1.0))),
            "flip": bool(rec.get("flip", False)),
            "pad_shape": (pad_to_divisor(h, size_divisor), pad_to_divisor(w, size_divisor)),
        })
        if with_masks:
            from raydet.masks import instance_masks_to_bitmaps

            kept = [m for m, ig in zip(rec["masks"], ignore) if not ig]
            masks.append(torch.from_numpy(instance_masks_to_bitmaps(kept, h, w)))
    batch_images = collate_images(images, size_divisor)
    for meta in metas:
        meta["batch_input_shape"] = tuple(batch_images.shape[-2:])
    batch = {"images": batch_images, "img_metas": metas, "gt_boxes": boxes, "gt_labels": labels,
             "gt_boxes_ignore": ignores}
    if with_masks:
        batch["gt_masks"] = masks
    return batch
