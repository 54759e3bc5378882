"""Drawing boxes, masks and class names on an image (OpenCV), for ``raydet browse`` and the analysis figures."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np

__all__ = ["label_color", "IGNORE_COLOR", "line_thickness", "draw_instances"]

IGNORE_COLOR = (160, 160, 160)  # ignored (crowd / difficult) boxes: grey outline, no tag


def label_color(label: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour per label (golden-ratio hues; label 0 is an orange)."""
    r, g, b = colorsys.hsv_to_rgb((int(label) * 0.618033988749895 + 0.1) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def line_thickness(height: int, width: int) -> int:
    """Box outline width in pixels: 1 up to 300 px on the short side, then one more per 300 px."""
    return max(1, round(min(height, width) / 300))


def draw_instances(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, class_names: list[str], *,
                   masks: np.ndarray | None = None, scores: np.ndarray | None = None,
                   ignore_boxes: np.ndarray | None = None) -> np.ndarray:
    """Draw instances on a copy of ``image``.

    Args:
        image: uint8 (h, w, 3) RGB.
        boxes: (n, 4) x1, y1, x2, y2 in pixels of ``image`` (x2, y2 exclusive: the outline's outer edge runs along
            columns x1 and x2 - 1, rows y1 and y2 - 1, coordinates rounded); labels (n,) indices into
            ``class_names``.
        masks: optional (n, h, w) bool / uint8 bitmaps, blended at 50% in the label's colour.
        scores: optional (n,): the tags read ``"<class> <score>"``; else ``"<class>"``.
        ignore_boxes: optional (k, 4) boxes drawn as grey outlines (:data:`IGNORE_COLOR`) without a tag.

    Each instance is drawn in :func:`label_color` of its label: mask, outline (:func:`line_thickness` wide, inwards)
    and a filled tag with the name in white: its rows end just above the box's top edge (when there is no room
    above, they start just inside it), its columns start at the box's left edge.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    thick = line_thickness(h, w)
    font_scale = max(0.3, min(h, w) / 800)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)

    def outline(box, color) -> tuple[int, int]:
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        x2, y2 = max(x1, x2 - 1), max(y1, y2 - 1)
        for t in range(thick):  # inwards, so the outer edge is the box edge
            cv2.rectangle(out, (x1 + t, y1 + t), (max(x1 + t, x2 - t), max(y1 + t, y2 - t)), color, 1)
        return x1, y1

    for box in np.asarray(ignore_boxes if ignore_boxes is not None else np.zeros((0, 4)), np.float64).reshape(-1, 4):
        outline(box, IGNORE_COLOR)
    if masks is not None:
        for m, label in zip(masks, labels):
            m = np.asarray(m, bool)
            color = np.asarray(label_color(label), np.float64)
            out[m] = (0.5 * out[m] + 0.5 * color).astype(np.uint8)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        color = label_color(label)
        x1, y1 = outline(box, color)
        name = class_names[label] if 0 <= label < len(class_names) else str(int(label))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        tag_h = th + base + 2
        top = y1 - tag_h if y1 - tag_h >= 0 else y1 + thick  # rows top .. top + tag_h - 1: above the box, else inside
        cv2.rectangle(out, (x1, top), (x1 + tw + 1, top + tag_h - 1), color, -1)
        cv2.putText(out, text, (x1 + 1, top + tag_h - 1 - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return out
