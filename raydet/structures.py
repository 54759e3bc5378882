"""The two data formats every raydet component shares.

**Record** (one image's annotations, as readers produce them; NumPy, no tensors)::

    {"image_id": int, "file_name": str, "height": int, "width": int,
     "boxes":  float32 (n, 4)  x1, y1, x2, y2 in pixels of the original image,
     "labels": int64   (n,)    contiguous class index in [0, num_classes),
     "ignore": bool    (n,)    crowd / difficult boxes: neither positive nor negative in training,
     "masks":  optional list of n instance masks, each a list of polygons (flat [x0, y0, x1, y1, ...])
               or a COCO RLE dict,
     "proposals": optional float32 (k, 4) precomputed proposals, original pixels (raydet.data.proposals)}

**Batch** (what ``model.loss`` and ``model.predict`` take; torch)::

    {"images":    float32 (B, 3, H, W), normalised and zero-padded (H, W multiples of the pad divisor),
     "img_metas": list of B dicts:
         ori_shape (h0, w0)   original image size,
         img_shape (h, w)     size after resize, before padding,
         pad_shape (Hp, Wp)   img_shape padded up to the size divisor (this image's own padding),
         batch_input_shape (H, W)  the batch tensor's spatial size,
         scale_factor (sx, sy) img_shape / ori_shape along x and y,
         flip bool, image_id int,
     "gt_boxes":  list of B float32 (n_i, 4) in img_shape pixels (after resize and flip),
     "gt_labels": list of B int64 (n_i,),
     "gt_boxes_ignore": optional list of B float32 (k_i, 4),
     "gt_masks":  optional list of B uint8 (n_i, h, w) bitmaps at img_shape,
     "proposals": optional list of B float32 (k_i, 4) in img_shape pixels, transformed as gt_boxes}

**Prediction** (``model.predict`` returns one per image, in original image pixels)::

    {"boxes": float32 (m, 4), "scores": float32 (m,), "labels": int64 (m,),
     "masks": bool (m, h0, w0)  (Mask R-CNN only),
     "mask_scores": float32 (m,)  (Mask Scoring R-CNN: the masks' scores for segm evaluation)}
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["image_to_tensor", "collate_images", "pad_to_divisor", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def image_to_tensor(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (3, H, W) float32 normalised."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t - m) / s


def pad_to_divisor(size: int, divisor: int) -> int:
    """The smallest multiple of ``divisor`` that is >= size."""
    return (size + divisor - 1) // divisor * divisor if divisor > 1 else size


def collate_images(images: list[torch.Tensor], size_divisor: int = 32) -> torch.Tensor:
    """Zero-pad a list of (3, h_i, w_i) tensors to one (B, 3, H, W) tensor, H and W multiples of size_divisor."""
    h = pad_to_divisor(max(int(i.shape[1]) for i in images), size_divisor)
    w = pad_to_divisor(max(int(i.shape[2]) for i in images), size_divisor)
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]] = img
    return out
