"""MaxIoUAssigner on hand-made cases, and against a literal loop transcription of MMDetection's algorithm."""
import pytest
import torch
from torchvision.ops import box_iou

from raydet.models.task_modules.assigners import AssignResult, MaxIoUAssigner
from raydet.registry import build

GTS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
LABELS = torch.tensor([3, 7])
BOXES = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],    # IoU 1 with gt 0
    [0.0, 0.0, 10.0, 5.0],     # IoU 0.5 with gt 0: between the thresholds
    [50.0, 50.0, 60.0, 60.0],  # IoU 0: negative
    [20.0, 20.0, 30.0, 45.0],  # IoU 100 / 250 = 0.4 with gt 1, gt 1's best box
])


def test_hand_case_with_low_quality_rescue():
    assigner = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
    res = assigner.assign(BOXES, GTS, LABELS)
    assert res.num_gts == 2
    assert res.gt_inds.tolist() == [1, -1, 0, 2]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([1.0, 0.5, 0.0, 0.4]))
    assert res.labels.tolist() == [3, -1, -1, 7]


def test_min_pos_iou_blocks_low_quality():
    res = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.5).assign(BOXES, GTS, LABELS)
    assert res.gt_inds.tolist() == [1, -1, 0, -1]
    assert res.labels.tolist() == [3, -1, -1, -1]


def test_low_quality_off():
    res = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                         match_low_quality=False).assign(BOXES, GTS, LABELS)
    assert res.gt_inds.tolist() == [1, -1, 0, -1]


def test_gt_max_assign_all_ties():
    boxes = torch.cat([BOXES, torch.tensor([[20.0, 5.0, 30.0, 30.0]])])  # also IoU 0.4 with gt 1
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(boxes, GTS, LABELS)
    assert res.gt_inds.tolist() == [1, -1, 0, 2, 2]
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, gt_max_assign_all=False).assign(boxes, GTS, LABELS)
    assert res.gt_inds.tolist() == [1, -1, 0, 2, -1]  # only the first box at the best IoU


def test_later_gt_overrides_shared_low_quality_box():
    gts = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 40.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    # Box 0 has IoU 0.5 with gt 0 and 0.25 with gt 1; both gts claim it as their best, gt 1 last.
    res = MaxIoUAssigner(0.7, 0.2, min_pos_iou=0.1).assign(boxes, gts, torch.tensor([4, 5]))
    assert res.gt_inds.tolist() == [2, 0]
    assert res.labels.tolist() == [5, -1]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([0.5, 0.0]))


def test_ignore_boxes_by_iof():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    ignore = torch.tensor([[50.0, 50.0, 100.0, 100.0]])
    boxes = torch.tensor([
        [60.0, 60.0, 70.0, 70.0],  # fully inside the ignore box: IoF 1
        [45.0, 45.0, 55.0, 55.0],  # IoF 25 / 100 = 0.25
        [0.0, 0.0, 10.0, 10.0],
    ])
    assigner = MaxIoUAssigner(0.5, 0.5, ignore_iof_thr=0.5, match_low_quality=False)
    res = assigner.assign(boxes, gts, torch.tensor([1]), gt_boxes_ignore=ignore)
    assert res.gt_inds.tolist() == [-1, 0, 1]
    assert res.max_overlaps[0].item() == -1
    assert assigner.assign(boxes, gts, torch.tensor([1])).gt_inds.tolist() == [0, 0, 1]
    # IoF relative to the ignore box's area: 100 / 2500, not ignored.
    wrt_ignore = MaxIoUAssigner(0.5, 0.5, ignore_iof_thr=0.5, ignore_wrt_candidates=False, match_low_quality=False)
    assert wrt_ignore.assign(boxes, gts, torch.tensor([1]), gt_boxes_ignore=ignore).gt_inds.tolist() == [0, 0, 1]
    # ignore_iof_thr <= 0 turns ignoring off.
    off = MaxIoUAssigner(0.5, 0.5, match_low_quality=False)
    assert off.assign(boxes, gts, torch.tensor([1]), gt_boxes_ignore=ignore).gt_inds.tolist() == [0, 0, 1]


def test_zero_gts_all_negative():
    res = MaxIoUAssigner(0.7, 0.3).assign(BOXES, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert res.num_gts == 0
    assert res.gt_inds.tolist() == [0, 0, 0, 0]
    assert res.labels.tolist() == [-1, -1, -1, -1]
    assert res.max_overlaps.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_zero_boxes():
    res = MaxIoUAssigner(0.7, 0.3).assign(torch.zeros(0, 4), GTS, LABELS)
    assert res.num_gts == 2
    assert res.gt_inds.shape == (0,) and res.labels.shape == (0,) and res.max_overlaps.shape == (0,)


def test_neg_iou_thr_band():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([
        [50.0, 50.0, 60.0, 60.0],  # IoU 0: below the band -> ignored
        [0.0, 0.0, 10.0, 2.0],     # IoU 0.2: inside [0.1, 0.3) -> negative
        [0.0, 0.0, 10.0, 10.0],    # positive
    ])
    res = MaxIoUAssigner(0.5, (0.1, 0.3), match_low_quality=False).assign(boxes, gts, torch.tensor([0]))
    assert res.gt_inds.tolist() == [-1, 0, 1]
    built = build({"type": "MaxIoUAssigner", "pos_iou_thr": 0.5, "neg_iou_thr": [0.1, 0.3],
                   "match_low_quality": False})
    assert built.assign(boxes, gts, torch.tensor([0])).gt_inds.tolist() == [-1, 0, 1]


def test_without_labels_positives_get_label_zero():
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(BOXES, GTS)
    assert res.labels.tolist() == [0, -1, -1, 0]


def test_gpu_assign_thr_gives_same_result():
    a = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(BOXES, GTS, LABELS)
    b = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, gpu_assign_thr=1).assign(BOXES, GTS, LABELS)
    assert torch.equal(a.gt_inds, b.gt_inds) and torch.equal(a.labels, b.labels)
    assert b.gt_inds.device == BOXES.device


def test_add_gt_prepends_self_assigned():
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(BOXES, GTS, LABELS)
    res.add_gt_(LABELS)
    assert res.gt_inds.tolist() == [1, 2, 1, -1, 0, 2]
    assert res.labels.tolist() == [3, 7, 3, -1, -1, 7]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 0.4]))


def reference_assign(boxes, gts, labels, pos, neg, min_pos, assign_all):
    """MMDetection's assign_wrt_overlaps written as its loops (independent of the vectorised code)."""
    overlaps = box_iou(gts, boxes)
    n = boxes.shape[0]
    inds = [-1] * n
    max_ov, argmax = overlaps.max(dim=0)
    for j in range(n):
        if 0 <= max_ov[j] < neg:
            inds[j] = 0
        if max_ov[j] >= pos:
            inds[j] = int(argmax[j]) + 1
    for i in range(gts.shape[0]):
        best = overlaps[i].max()
        if best >= min_pos:
            if assign_all:
                for j in range(n):
                    if overlaps[i, j] == best:
                        inds[j] = i + 1
            else:
                inds[int(overlaps[i].argmax())] = i + 1
    out_labels = [int(labels[k - 1]) if k > 0 else -1 for k in inds]
    return inds, out_labels


@pytest.mark.parametrize("assign_all", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(seed, assign_all):
    gen = torch.Generator().manual_seed(seed)
    # Coarse integer coordinates make tied IoUs and shared best boxes likely.
    def rand_boxes(n):
        xy = torch.randint(0, 6, (n, 2), generator=gen).float() * 4
        wh = torch.randint(1, 4, (n, 2), generator=gen).float() * 4
        return torch.cat([xy, xy + wh], 1)
    # Every box twice (ties at a gt's best IoU) and many gts (gts sharing a best box).
    boxes, gts = rand_boxes(30).repeat(2, 1), rand_boxes(12)
    labels = torch.randint(0, 80, (12,), generator=gen)
    res = MaxIoUAssigner(0.5, 0.3, min_pos_iou=0.2, gt_max_assign_all=assign_all).assign(boxes, gts, labels)
    inds, out_labels = reference_assign(boxes, gts, labels, 0.5, 0.3, 0.2, assign_all)
    assert res.gt_inds.tolist() == inds
    assert res.labels.tolist() == out_labels
    assert isinstance(res, AssignResult)
