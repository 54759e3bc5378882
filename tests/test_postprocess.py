"""boxes_to_original and paste_masks: hand-computed cases and an independent per-pixel reference.

The paste convention (Detectron2 / MMDetection ``_do_paste_mask``): output pixel (x, y) has its centre at
(x + 0.5, y + 0.5); the box's M x M mask covers [x1, x2] x [y1, y2], mask cell j covering
[x1 + j * w / M, x1 + (j + 1) * w / M), and is sampled bilinearly with zeros outside the mask.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydet.models.postprocess import boxes_to_original, paste_masks


# ------------------------------------------------------------------------------------------------ boxes_to_original
def test_boxes_to_original_undoes_the_resize():
    # The image was resized by sx = 0.5, sy = 0.25: divide x by 0.5 and y by 0.25.
    meta = {"ori_shape": (200, 100), "img_shape": (50, 50), "scale_factor": (0.5, 0.25)}
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out = boxes_to_original(boxes, meta)
    assert torch.equal(out, torch.tensor([[20.0, 80.0, 60.0, 160.0]]))
    assert torch.equal(boxes, torch.tensor([[10.0, 20.0, 30.0, 40.0]]))  # input untouched


def test_boxes_to_original_clips_to_the_original_shape():
    meta = {"ori_shape": (200, 100), "img_shape": (50, 50), "scale_factor": (0.5, 0.25)}
    # [40, 45, 60, 55] -> [80, 180, 120, 220] -> x clipped to 100 (width), y to 200 (height).
    out = boxes_to_original(torch.tensor([[40.0, 45.0, 60.0, 55.0], [-4.0, -1.0, 2.0, 3.0]]), meta)
    assert torch.equal(out, torch.tensor([[80.0, 180.0, 100.0, 200.0], [0.0, 0.0, 4.0, 12.0]]))


def test_boxes_to_original_undoes_the_flip_in_the_resized_frame():
    # Flipped in the resized 50 x 60 image: x -> 60 - x (x1 and x2 swap roles), then undo the resize.
    meta = {"ori_shape": (200, 120), "img_shape": (50, 60), "scale_factor": (0.5, 0.25), "flip": True}
    out = boxes_to_original(torch.tensor([[10.0, 5.0, 20.0, 15.0]]), meta)
    assert torch.equal(out, torch.tensor([[80.0, 20.0, 100.0, 60.0]]))


def test_boxes_to_original_defaults_to_identity_and_handles_no_boxes():
    meta = {"ori_shape": (30, 40), "img_shape": (30, 40)}
    boxes = torch.tensor([[1.5, 2.5, 10.0, 20.0]])
    assert torch.equal(boxes_to_original(boxes, meta), boxes)
    assert boxes_to_original(torch.zeros((0, 4)), meta).shape == (0, 4)


# ------------------------------------------------------------------------------------------------ paste_masks
def reference_paste(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Per-pixel float64 reference of the convention in the module docstring (written independently, loops)."""
    m = mask.shape[0]
    x1, y1, x2, y2 = box
    out = np.zeros((height, width))

    def value(r, c):
        return mask[r, c] if 0 <= r < m and 0 <= c < m else 0.0

    for y in range(height):
        for x in range(width):
            # continuous mask coordinates, cell centres at j + 0.5
            u = (x + 0.5 - x1) / (x2 - x1) * m - 0.5
            v = (y + 0.5 - y1) / (y2 - y1) * m - 0.5
            c0, r0 = math.floor(u), math.floor(v)
            fu, fv = u - c0, v - r0
            out[y, x] = ((1 - fv) * ((1 - fu) * value(r0, c0) + fu * value(r0, c0 + 1))
                         + fv * ((1 - fu) * value(r0 + 1, c0) + fu * value(r0 + 1, c0 + 1)))
    return out


def inside_box(box, height, width):
    """bool (h, w): pixels whose centre lies strictly inside the box."""
    ys = np.arange(height)[:, None] + 0.5
    xs = np.arange(width)[None, :] + 0.5
    x1, y1, x2, y2 = box
    return (xs > x1) & (xs < x2) & (ys > y1) & (ys < y2)


def test_all_ones_mask_fills_exactly_the_pixels_whose_centres_are_in_the_box():
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 100, 100)
    assert out.dtype == torch.bool and out.shape == (1, 100, 100)
    expected = torch.zeros(100, 100, dtype=torch.bool)
    expected[20:60, 10:30] = True  # y 20..59, x 10..29
    assert torch.equal(out[0], expected)
    assert int(out.sum()) == 20 * 40


@pytest.mark.parametrize("box", [[-10.0, -4.0, 12.0, 8.0], [90.0, 0.0, 130.0, 28.0], [3.0, 5.0, 4.0, 6.0]])
def test_all_ones_mask_fills_integer_boxes_clipped_to_the_image(box):
    # For integer boxes no larger than ~2 M, every pixel centre inside is >= 0.5 px from each edge, so it samples
    # >= 0.5 even at the corners, and every centre outside samples < 0.5: exactly the centre-inside pixels.
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([box]), 100, 100)
    assert np.array_equal(out[0].numpy(), inside_box(box, 100, 100))


@pytest.mark.parametrize("box", [[10.3, 20.7, 30.2, 59.6], [-10.0, -4.5, 12.25, 7.6]])
def test_all_ones_mask_on_fractional_boxes_follows_the_bilinear_rule(box):
    # Along one edge the sampled value is 0.5 + d * M / w for a centre d pixels inside (0.5 - d * M / w outside), so
    # away from the corners the pixels are those whose centres are inside; at a corner the two edge factors
    # multiply, and a corner pixel whose centre is barely inside can fall below 0.5 (as in Detectron2).
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([box]), 100, 100)[0].numpy()
    ref = reference_paste(np.ones((28, 28)), box, 100, 100) >= 0.5
    assert np.array_equal(out, ref)
    assert not (out & ~inside_box(box, 100, 100)).any()  # never a pixel whose centre is outside


def test_left_half_mask_pastes_into_the_left_half_of_the_box():
    mask = torch.zeros(1, 28, 28)
    mask[:, :, :14] = 1.0
    out = paste_masks(mask, torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 100, 100)
    expected = torch.zeros(100, 100, dtype=torch.bool)
    expected[20:60, 10:20] = True  # the box's left half: x 10..19
    assert torch.equal(out[0], expected)


def test_paste_matches_an_independent_bilinear_reference():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 7, 7, generator=gen)
    boxes = torch.tensor([[2.3, 1.7, 17.6, 11.2], [-3.0, 4.0, 9.5, 25.0], [5.0, 5.0, 6.5, 8.0]])
    probs = paste_masks(masks, boxes, 20, 24, threshold=-1)
    assert probs.dtype == torch.float32 and probs.shape == (3, 20, 24)
    for i in range(3):
        ref = reference_paste(masks[i].double().numpy(), boxes[i].tolist(), 20, 24)
        np.testing.assert_allclose(probs[i].numpy(), ref, atol=1e-5)
    binary = paste_masks(masks, boxes, 20, 24, threshold=0.5)
    assert torch.equal(binary, probs >= 0.5)


def test_negative_threshold_returns_probabilities():
    out = paste_masks(torch.full((1, 28, 28), 0.3), torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 100, 100, threshold=-1)
    assert out.dtype == torch.float32
    # Mask cells span 20/28 px in x and 40/28 px in y; a pixel samples the mask's value when its centre is at least
    # half a cell inside, i.e. for x in 10..29 (10.5 - 10 >= 10/28) and y in 21..58.
    assert torch.allclose(out[0, 21:59, 10:30], torch.tensor(0.3))
    # Row y = 20: centre 0.5 px below y1 = 0.35 cells, i.e. 0.15 cell outside the first cell centre, weight 0.85.
    assert torch.allclose(out[0, 20, 10:30], torch.tensor(0.3 * 0.85))
    # Row y = 19 (centre 0.85 cell outside the first cell centre) still gets weight 0.15; beyond that, nothing.
    assert torch.allclose(out[0, 19, 10:30], torch.tensor(0.3 * 0.15))
    outside = torch.ones(100, 100, dtype=torch.bool)
    outside[19:61, 10:30] = False
    assert torch.all(out[0][outside] == 0)


def test_chunking_gives_the_same_result():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(5, 28, 28, generator=gen)
    xy = torch.rand(5, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(5, 2, generator=gen) * 30], dim=1)
    whole = paste_masks(masks, boxes, 50, 60, threshold=-1)
    chunked = paste_masks(masks, boxes, 50, 60, threshold=-1, max_elements=2 * 50 * 60)  # chunks of 2
    single = paste_masks(masks, boxes, 50, 60, threshold=-1, max_elements=1)  # chunks of 1
    assert torch.equal(whole, chunked) and torch.equal(whole, single)
    assert torch.equal(paste_masks(masks, boxes, 50, 60, max_elements=1), whole >= 0.5)


def test_no_masks():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), 10, 12)
    assert out.shape == (0, 10, 12) and out.dtype == torch.bool


# ------------------------------------------------------------------------------------------------ Soft-NMS
# A = [0,0,10,10] (0.9), B = [0,0,10,5] (0.8), C = [0,6,10,10] (0.7).
# IoU(A, B) = 50 / 100 = 0.5 (exactly N_t below), IoU(A, C) = 40 / 100 = 0.4, IoU(B, C) = 0 (B ends at y 5).
SOFT_BOXES = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 6, 10, 10]], dtype=torch.float32)
SOFT_SCORES = torch.tensor([0.9, 0.8, 0.7])


def _detection_cfg(**kw):
    from raydet.models.head_configs import DetectionConfig

    return DetectionConfig(**{"nms_iou": 0.5, "max_per_img": 100, **kw})


def test_linear_soft_nms_decays_at_iou_equal_to_the_threshold():
    from raydet.ops import soft_nms

    # Bodla et al. 2017, eq. 2: s_i *= 1 - IoU when IoU >= N_t. Pick A: B has IoU 0.5 >= 0.5 -> 0.8 * 0.5 = 0.4;
    # C has 0.4 < 0.5 -> 0.7. Pick C (0.7): IoU(C, B) = 0, B stays 0.4. Pick B. (With "> N_t" B would stay 0.8.)
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, iou_threshold=0.5, method="linear")
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.4]))
    # min_score 0.5 drops B once it has decayed to 0.4
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, iou_threshold=0.5, min_score=0.5, method="linear")
    assert keep.tolist() == [0, 2]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7]))


def test_gaussian_soft_nms_by_hand():
    from raydet.ops import soft_nms

    # eq. 3, sigma 0.5, no threshold. Pick A: B = 0.8 exp(-0.25 / 0.5) = 0.4852, C = 0.7 exp(-0.16 / 0.5) = 0.5083.
    # Pick C: IoU(C, B) = 0, B x exp(0). Pick B.
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, sigma=0.5, method="gaussian")
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7 * math.exp(-0.32), 0.8 * math.exp(-0.5)]))


def test_detection_nms_follows_the_test_settings_class_by_class():
    from raydet.models.postprocess import detection_nms

    same = torch.zeros(3, dtype=torch.long)
    keep, scores = detection_nms(SOFT_BOXES, SOFT_SCORES, same, _detection_cfg(nms={"type": "soft_nms"}))
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.4]))
    gaussian = _detection_cfg(nms={"type": "soft_nms", "method": "gaussian", "sigma": 0.5})
    keep, scores = detection_nms(SOFT_BOXES, SOFT_SCORES, same, gaussian)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7 * math.exp(-0.32), 0.8 * math.exp(-0.5)]))
    # B of another class: nothing decays it (per class, as batched_nms)
    keep, scores = detection_nms(SOFT_BOXES, SOFT_SCORES, torch.tensor([0, 1, 0]),
                                 _detection_cfg(nms={"type": "soft_nms"}))
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8, 0.7]))
    # hard NMS (torchvision: drop IoU > 0.5): nothing is dropped, scores unchanged; max_per_img cuts the list
    keep, scores = detection_nms(SOFT_BOXES, SOFT_SCORES, same, _detection_cfg())
    assert keep.tolist() == [0, 1, 2] and scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    keep, scores = detection_nms(SOFT_BOXES, SOFT_SCORES, same, _detection_cfg(nms={"type": "soft_nms"}, max_per_img=2))
    assert keep.tolist() == [0, 2]


def test_soft_nms_settings_are_checked_when_the_pipeline_builds():
    import raydet.models  # noqa: F401
    from raydet.config import load_config
    from raydet.registry import ConfigError

    for bad, key in (("{nms: {type: softnms}}", r"nms\.type"),
                     ("{nms: {type: soft_nms, method: cubic}}", r"nms\.method"),
                     ("{nms: {type: soft_nms, sigma: 0}}", r"nms\.sigma"),
                     ("{nms: {type: soft_nms, sigmaa: 0.5}}", r"unknown key 'sigmaa'.*did you mean 'sigma'")):
        cfg = load_config(PIPELINES / "quickstart.yaml", [f"model.roi_head.test={bad}"])
        with pytest.raises(ConfigError, match=rf"model\.roi_head\.test.*{key}"):
            cfg.build("model")


def _box_iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_soft_nms(boxes, scores, labels, nt, method, sigma, min_score):
    """Algorithm 1 of Bodla et al. 2017, class by class, in float64 Python: [(candidate index, final score)]."""
    out = []
    for c in sorted(set(labels)):
        s = {i: float(scores[i]) for i in range(len(labels)) if labels[i] == c and scores[i] >= min_score}
        while s:
            m = max(s, key=s.get)
            out.append((m, s.pop(m)))
            for i in list(s):
                iou = _box_iou(boxes[m], boxes[i])
                s[i] *= (1 - iou if iou >= nt else 1.0) if method == "linear" else math.exp(-iou * iou / sigma)
                if s[i] < min_score:
                    del s[i]
    return sorted(out, key=lambda t: -t[1])


PIPELINES = __import__("pathlib").Path(__file__).resolve().parents[1] / "pipelines"
TINY_RETINA = ["num_classes=3", "model.backbone.depth=18", "model.neck.in_channels=[64, 128, 256, 512]",
               "model.neck.out_channels=64", "model.bbox_head.in_channels=64", "model.bbox_head.feat_channels=64"]


@pytest.mark.parametrize("pipeline, key, method, min_score, extra", [
    ("quickstart.yaml", "model.roi_head.test", "linear", 0.05, []),
    ("retinanet_r50_fpn_1x_coco.yaml", "model.bbox_head.test", "gaussian", 0.02, TINY_RETINA),
], ids=["faster_rcnn_linear", "retinanet_gaussian"])
def test_a_detector_pipeline_with_soft_nms_runs_its_test_path(pipeline, key, method, min_score, extra):
    """The pipeline builds with Soft-NMS in its test settings and predicts on a 64 x 64 image; its detections are the
    paper's algorithm applied to the same candidates (got from the same model with no suppression: hard NMS at
    IoU 1.0)."""
    import dataclasses

    import raydet.models  # noqa: F401
    from raydet.config import load_config
    from raydet.data.collate import collate_samples

    soft = f"{{nms: {{type: soft_nms, method: {method}, sigma: 0.5, min_score: {min_score}}}, nms_iou: 0.5, " \
           f"score_thr: {min_score}, max_per_img: 1000}}"
    torch.manual_seed(0)
    model = load_config(PIPELINES / pipeline, [*extra, f"{key}={soft}"]).build("model").eval()
    head = model.roi_head if "roi_head" in key else model.bbox_head
    # spread the untrained classifier's scores (RetinaNet's prior gives all about 0.01): no near-ties in the ranking
    cls = head.bbox_head.fc_cls if "roi_head" in key else head.retina_cls
    torch.nn.init.normal_(cls.weight, std=0.3)
    torch.nn.init.zeros_(cls.bias)
    assert head.test.soft_nms_args() == {"method": method, "sigma": 0.5, "min_score": min_score}
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    batch = collate_samples([(image, {"image_id": 1, "boxes": np.zeros((0, 4)), "labels": np.zeros(0)})])
    with torch.no_grad():
        out = model(batch, mode="predict")[0]
        soft_cfg = head.test
        head.test = dataclasses.replace(soft_cfg, nms=None, nms_iou=1.0, max_per_img=100000)
        cand = model(batch, mode="predict")[0]
        head.test = soft_cfg
    boxes, scores, labels = (cand[k].double().tolist() if k != "labels" else cand[k].tolist()
                             for k in ("boxes", "scores", "labels"))
    assert len(labels) > 50  # an untrained head: many overlapping candidates
    expected = reference_soft_nms(boxes, scores, labels, 0.5, method, 0.5, min_score)
    assert 0 < len(expected) < len(labels)
    assert len(out["scores"]) == len(expected)
    torch.testing.assert_close(out["scores"].double(), torch.tensor([s for _, s in expected], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    got = sorted(zip(out["labels"].tolist(), out["boxes"].tolist()))
    want = sorted((labels[i], boxes[i]) for i, _ in expected)
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-4)
