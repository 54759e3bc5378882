"""Detectron2 checkpoints convert onto the pipelines of ``pipelines/zoo/detectron2/`` (no Detectron2, no network).

The reference is Detectron2's own model definitions, through the fixtures ``tests/fixtures/interop/detectron2/*.json``
(written once by ``make_detectron2_fixtures.py`` there from Detectron2's ``build_model``): the ordered keys and shapes
of each model's ``state_dict()``, its parameter count and the merged config's test-time settings. A state dict of
random tensors with those keys and shapes stands for a trained checkpoint; the pipelines' settings are checked
against the merged config's values.
"""
from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.engine.checkpoint import load_checkpoint, load_model_weights
from raydet.interop import ConversionError, convert_state_dict
from raydet.interop.detectron2 import check_normalization, load_detectron2, pipeline_normalization, to_detectron2
from raydet.models.task_modules.prior_generators import AnchorGenerator

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "pipelines" / "zoo" / "detectron2"
FIXTURES = ROOT / "tests" / "fixtures" / "interop" / "detectron2"
NAMES = ["faster_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_FPN_1x", "retinanet_R_50_FPN_1x", "rpn_R_50_FPN_1x"]
BGR_MEAN = [103.53, 116.28, 123.675]


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _checkpoint(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the fixture's keys and shapes, in its order; the buffers Detectron2 fills from its config
    (pixel_mean / pixel_std, the cell anchors) with their values."""
    fixture = _fixture(name)
    gen = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=gen) for key, shape in fixture["state_dict"]}
    state["pixel_mean"] = torch.tensor(fixture["cfg"]["MODEL.PIXEL_MEAN"]).view(-1, 1, 1)
    state["pixel_std"] = torch.tensor(fixture["cfg"]["MODEL.PIXEL_STD"]).view(-1, 1, 1)
    for i, cells in enumerate(fixture["model"]["cell_anchors"]):
        key = [k for k, _ in fixture["state_dict"] if k.endswith(f"anchor_generator.cell_anchors.{i}")][0]
        state[key] = torch.tensor(cells)
    return state


@pytest.fixture(scope="module")
def checkpoints():
    """Each fixture's random checkpoint (:func:`_checkpoint`), made once on first use; tests copy before changing."""
    made: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str) -> dict[str, torch.Tensor]:
        if name not in made:
            made[name] = _checkpoint(name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def models():
    """Each zoo pipeline's model, built once on first use on the meta device (keys and shapes; no storage)."""
    built: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in built:
            with torch.device("meta"):
                built[name] = load_config(ZOO / f"{name}.yaml").build("model")
        return built[name]

    return get


# ------------------------------------------------------------------------------------------------------------------
# Every tensor placed, every model tensor filled, and back


# Tensors followed by hand: the MSRA ResNet's norms and shortcut, the FPN levels (RetinaNet's from res3, with P6 / P7
# convs), the heads' layers (raydet's conv towers interleave their ReLUs), the box predictor's background-last slots.
HAND = {
    "mask_rcnn_R_50_FPN_1x": {
        "backbone.bn1.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
        "backbone.layer2.0.downsample.1.weight": "backbone.bottom_up.res3.0.shortcut.norm.weight",
        "backbone.layer4.2.conv3.weight": "backbone.bottom_up.res5.2.conv3.weight",
        "neck.lateral_convs.0.0.weight": "backbone.fpn_lateral2.weight",
        "neck.fpn_convs.3.0.bias": "backbone.fpn_output5.bias",
        "rpn_head.rpn_reg.weight": "proposal_generator.rpn_head.anchor_deltas.weight",
        "roi_head.bbox_head.shared_fcs.2.weight": "roi_heads.box_head.fc2.weight",
        "roi_head.bbox_head.fc_cls.bias": "roi_heads.box_predictor.cls_score.bias",
        "roi_head.mask_head.convs.6.weight": "roi_heads.mask_head.mask_fcn4.weight",
        "roi_head.mask_head.upsample.weight": "roi_heads.mask_head.deconv.weight"},
    "retinanet_R_50_FPN_1x": {
        "neck.lateral_convs.0.0.weight": "backbone.fpn_lateral3.weight",
        "neck.extra_convs.1.0.weight": "backbone.top_block.p7.weight",
        "bbox_head.cls_convs.6.weight": "head.cls_subnet.6.weight"},
}


@pytest.mark.parametrize("name", NAMES)
def test_reference_checkpoint_converts_completely_and_round_trips(name, models, checkpoints):
    fixture = _fixture(name)
    state = checkpoints(name)
    model = models(name)
    mapped, report = convert_state_dict(state, model, "detectron2", f"{name}.pkl")

    # every source tensor accounted for: the 7 buffers Detectron2 derives from its config dropped, the rest placed
    anchors = [k for k in state if "cell_anchors" in k]
    assert len(anchors) == 5
    assert sorted(p.source for p in report.dropped) == sorted(["pixel_mean", "pixel_std"] + anchors)
    assert len(report.placed) == len(fixture["state_dict"]) - 7
    assert len(report.placed) + len(report.dropped) == len(state)
    model.load_state_dict(mapped, strict=True, assign=True)  # zero missing, zero unexpected, equal shapes
    if name != "rpn_R_50_FPN_1x":  # Detectron2's 80 COCO classes: the category ids in increasing order
        assert report.classes[:3] == ["person", "bicycle", "car"] and report.classes[-1] == "toothbrush"
        assert report.cat_ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and report.cat_ids[-1] == 90
    for ours, theirs in HAND.get(name, {}).items():
        assert torch.equal(mapped[ours], state[theirs]), ours

    back = to_detectron2(mapped, model)
    assert sorted(back) == sorted(p.source for p in report.placed)
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_retinanet_anchors_are_reordered_from_size_major_to_ratio_major(models, checkpoints):
    """Detectron2 numbers a location's anchors size-major (a = s * 3 + r), raydet ratio-major (a = r * 3 + s):
    raydet's anchor 1 (ratio 0.5, size 40.3) is Detectron2's anchor 3, anchor 0 (ratio 0.5, size 32) stays."""
    state = checkpoints("retinanet_R_50_FPN_1x")
    mapped, report = convert_state_dict(state, models("retinanet_R_50_FPN_1x"), "detectron2")
    cls, reg = mapped["bbox_head.retina_cls.weight"], mapped["bbox_head.retina_reg.bias"]
    assert torch.equal(cls[80:160], state["head.cls_score.weight"][240:320])
    assert torch.equal(reg[4:8], state["head.bbox_pred.bias"][12:16])
    assert torch.equal(cls[:80], state["head.cls_score.weight"][:80])
    assert torch.equal(cls[8 * 80:], state["head.cls_score.weight"][8 * 80:])  # anchor 8 = 2 * 3 + 2 both ways
    notes = {p.source: p.note for p in report.placed if p.note}
    assert set(notes) == {"head.cls_score.weight", "head.cls_score.bias", "head.bbox_pred.weight",
                          "head.bbox_pred.bias"}


# ------------------------------------------------------------------------------------------------------------------
# The pipelines mirror the merged configs


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_mirrors_detectron2s_test_settings_and_parameter_count(name):
    fixture = _fixture(name)
    cfg, facts = fixture["cfg"], fixture["model"]
    pipeline = load_config(ZOO / f"{name}.yaml")
    with torch.device("meta"):
        model = pipeline.build("model")
    # the same parameters: no class slot differs (Detectron2's K + 1 softmax and 4 K regressor are raydet's)
    ours = sum(p.numel() for p in model.parameters())
    assert ours == fixture["num_params"]
    text = (ROOT / "MODEL_ZOO.md").read_text()
    config = fixture["config"].removeprefix("configs/").removesuffix(".yaml")
    row = f"| [`{name}`](pipelines/zoo/detectron2/{name}.yaml) | `{config}` | {ours:,} | {fixture['num_params']:,} |"
    assert row in text[text.index("## Parameter counts"):], row

    norm = pipeline_normalization(pipeline)
    assert norm == {"mean": cfg["MODEL.PIXEL_MEAN"], "std": cfg["MODEL.PIXEL_STD"],
                    "to_rgb": cfg["INPUT.FORMAT"] == "RGB"}
    resize = pipeline.get("data.test.pipeline")[0]
    assert resize["scale"] == [cfg["INPUT.MAX_SIZE_TEST"], cfg["INPUT.MIN_SIZE_TEST"]] and resize["backend"] == "pillow"

    backbone = model.backbone
    assert backbone.depth == cfg["MODEL.RESNETS.DEPTH"]
    assert (backbone.layer2[0].conv1.stride == (2, 2)) == cfg["MODEL.RESNETS.STRIDE_IN_1X1"]
    assert backbone.frozen_stages == cfg["MODEL.BACKBONE.FREEZE_AT"] - 1
    assert {m.eps for m in backbone.modules() if hasattr(m, "running_var")} == set(facts["frozen_bn_eps"])
    assert model.neck.out_channels == cfg["MODEL.FPN.OUT_CHANNELS"]

    retina = cfg["MODEL.META_ARCHITECTURE"] == "RetinaNet"
    head = model.bbox_head if retina else model.rpn_head
    gen = head.anchor_generator
    assert gen.strides == facts["anchor_strides"] and gen.center_offset == cfg["MODEL.ANCHOR_GENERATOR.OFFSET"]
    assert gen.ratios == cfg["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"][0]
    # the pipeline's base anchors (built off the meta device), against Detectron2's cell anchors
    settings = dict(pipeline.get(f"model.{'bbox_head' if retina else 'rpn_head'}.anchor_generator"))
    cpu_gen = AnchorGenerator(**{k: v for k, v in settings.items() if k != "type"})
    sizes = len(cfg["MODEL.ANCHOR_GENERATOR.SIZES"][0])
    order = [s * 3 + r for r in range(3) for s in range(sizes)]  # Detectron2's anchor of each raydet anchor
    for level, cells in enumerate(facts["cell_anchors"]):
        expected = torch.tensor(cells)[order]
        assert torch.allclose(cpu_gen.base_anchors[level], expected, atol=1e-3), level
    weights = cfg["MODEL.RETINANET.BBOX_REG_WEIGHTS" if retina else "MODEL.RPN.BBOX_REG_WEIGHTS"]
    assert head.bbox_coder.stds == tuple(1 / w for w in weights) and head.bbox_coder.clamp_dwh == "max"
    assert math.log(1000 / 16) == pytest.approx(facts["scale_clamp"])

    if retina:
        test = head.test
        assert (test.score_thr, test.nms_pre, test.nms_iou, test.max_per_img) == (
            cfg["MODEL.RETINANET.SCORE_THRESH_TEST"], cfg["MODEL.RETINANET.TOPK_CANDIDATES_TEST"],
            cfg["MODEL.RETINANET.NMS_THRESH_TEST"], cfg["TEST.DETECTIONS_PER_IMAGE"])
        assert head.bbox_coder.clip_border is False  # Detectron2's RetinaNet clips only after NMS
        assert len(head.cls_convs) == 2 * cfg["MODEL.RETINANET.NUM_CONVS"] and head.num_classes == 80
        assert model.neck.start_level == 1 and model.neck.add_extra_convs == "on_input"
        return
    proposals = head.test_proposals
    assert (proposals.nms_pre, proposals.max_per_img, proposals.nms_iou, proposals.min_bbox_size) == (
        cfg["MODEL.RPN.PRE_NMS_TOPK_TEST"], cfg["MODEL.RPN.POST_NMS_TOPK_TEST"], cfg["MODEL.RPN.NMS_THRESH"],
        cfg["MODEL.PROPOSAL_GENERATOR.MIN_SIZE"])
    assert (head.train_proposals.nms_pre, head.train_proposals.max_per_img) == (
        cfg["MODEL.RPN.PRE_NMS_TOPK_TRAIN"], cfg["MODEL.RPN.POST_NMS_TOPK_TRAIN"])
    if cfg["MODEL.META_ARCHITECTURE"] == "ProposalNetwork":
        return
    roi = model.roi_head
    pools = [("box_pooler", roi.bbox_roi_extractor)] + (
        [("mask_pooler", roi.mask_roi_extractor)] if cfg["MODEL.MASK_ON"] else [])
    for key, extractor in pools:
        pooler = facts[key]
        assert [extractor.output_size] * 2 == pooler["output_size"]
        assert (extractor.sampling_ratio, extractor.aligned) == (pooler["sampling_ratio"], pooler["aligned"])
        # raydet's "detectron2" level mapping is ROIPooler's with its default canonical box 224 px at level 4
        assert extractor.level_mapping == "detectron2"
        assert (pooler["canonical_box_size"], pooler["canonical_level"]) == (224, 4)
        assert extractor.featmap_strides == [2 ** k for k in range(pooler["min_level"], pooler["max_level"] + 1)]
    bbox = roi.bbox_head
    assert bbox.bbox_coder.stds == tuple(1 / w for w in cfg["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"])
    assert (roi.test.score_thr, roi.test.nms_iou, roi.test.max_per_img) == (
        cfg["MODEL.ROI_HEADS.SCORE_THRESH_TEST"], cfg["MODEL.ROI_HEADS.NMS_THRESH_TEST"],
        cfg["TEST.DETECTIONS_PER_IMAGE"])
    assert bbox.reg_class_agnostic == cfg["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"]


# ------------------------------------------------------------------------------------------------------------------
# Files: Detectron2's .pkl through raydet convert, and what is refused


def _write_pkl(path: Path, state: dict[str, torch.Tensor], protocol: int = 3) -> None:
    """A file in the model zoo's layout: a pickled dict whose ``model`` maps names to numpy arrays, the module of
    numpy's array reconstruction named as numpy 1.x names it (``numpy.core.multiarray``, as in the model zoo's files;
    numpy 2 writes ``numpy._core.multiarray``)."""
    data = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo",
            "matching_heuristics": True}
    assert protocol in (2, 3)  # GLOBAL opcodes (module and name on text lines) and no frames: renamed in place
    raw = pickle.dumps(data, protocol=protocol).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy._core" not in raw and b"numpy.core.multiarray\n_reconstruct\n" in raw
    path.write_bytes(raw)


def test_raydet_convert_reads_a_model_zoo_pkl_that_raydet_test_loads(checkpoints, tmp_path, capsys):
    """The RPN (the smallest of the four files) through the command."""
    from raydet.cli import main

    name = "rpn_R_50_FPN_1x"
    state = checkpoints(name)
    src, out = tmp_path / "model_final_02ce48.pkl", tmp_path / "out" / "rpn_d2.pt"
    _write_pkl(src, state)
    pipeline = str(ZOO / f"{name}.yaml")
    assert main(["convert", str(src), str(out), "--from", "detectron2", "--pipeline", pipeline]) == 0
    printed = capsys.readouterr().out
    assert "287 source tensors placed, 7 dropped (detectron2)" in printed
    assert "pixel_mean: Detectron2's input normalisation (MODEL.PIXEL_MEAN [103.53, 116.28, 123.675])" in printed
    checkpoint = load_checkpoint(out)
    assert checkpoint["meta"]["converted_from"]["source_format"] == "detectron2"
    model = load_config(pipeline).build("model")
    load_model_weights(model, checkpoint["model"], str(out))  # what raydet test / infer do
    assert torch.equal(model.rpn_head.rpn_cls.weight, state["proposal_generator.rpn_head.objectness_logits.weight"])
    assert torch.equal(model.backbone.layer1[0].conv2.weight, state["backbone.bottom_up.res2.0.conv2.weight"])


def test_pkl_reader_refuses_other_pickles_without_running_them(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "model_final_evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"w": Payload()}, "__author__": "x"}, protocol=2))
    with pytest.raises(ConversionError, match=r"refusing to unpickle (posix|os|nt)\.system: a Detectron2 \.pkl "
                                              r"holds only numpy arrays"):
        load_detectron2(evil)
    assert not marker.exists()

    # a protocol-2 pickle (Python 3 writes its bytes as _codecs.encode of latin-1 text)
    old = tmp_path / "model_final_old.pkl"
    weight = torch.arange(12.0).view(3, 4)
    _write_pkl(old, {"roi_heads.box_head.fc1.weight": weight, "pixel_std": torch.ones(3, 1, 1)}, protocol=2)
    assert b"_codecs" in old.read_bytes()
    read = load_detectron2(old)
    assert list(read) == ["roi_heads.box_head.fc1.weight", "pixel_std"]
    assert torch.equal(read["roi_heads.box_head.fc1.weight"], weight)

    caffe2 = tmp_path / "R-50.pkl"
    caffe2.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}, protocol=2))
    with pytest.raises(ConversionError, match=r"Caffe2 / Detectron \(v1\) pickle \('blobs'\)"):
        load_detectron2(caffe2)

    # a Detectron2 training checkpoint (.pth) is read with torch.load(weights_only=True), its 'model' taken
    pth = tmp_path / "model_final.pth"
    torch.save({"model": {"roi_heads.box_head.fc1.weight": weight}, "iteration": 89999}, pth)
    assert torch.equal(load_detectron2(pth)["roi_heads.box_head.fc1.weight"], weight)


def test_another_architecture_class_count_or_normalisation_fails_clearly(models, checkpoints, tmp_path):
    frcnn = models("faster_rcnn_R_50_FPN_1x")
    retina_state = checkpoints("retinanet_R_50_FPN_1x")
    with pytest.raises(ConversionError) as exc:
        convert_state_dict(retina_state, frcnn, "detectron2", "model_final_bfca0b.pkl")
    message = str(exc.value)
    assert message.startswith("model_final_bfca0b.pkl does not fit the pipeline's model")
    assert ("source tensors have no place in the model, e.g. backbone.top_block.p6.weight [256, 2048, 3, 3], "
            "backbone.top_block.p6.bias [256], backbone.top_block.p7.weight [256, 256, 3, 3]") in message
    assert "model tensors have no source, e.g. neck.lateral_convs.0.0.weight [256, 256, 1, 1]" in message

    state = dict(checkpoints("faster_rcnn_R_50_FPN_1x"))
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(21, 1024)
    with pytest.raises(ConversionError, match=r"has 20 classes \(roi_heads\.box_predictor\.cls_score \[21, 1024\]: "
                                              r"classes \+ background\) but the pipeline's model has 80"):
        convert_state_dict(state, frcnn, "detectron2", "voc.pkl")

    # a BGR, mean-only checkpoint onto a pipeline normalising RGB with ImageNet's std: refused when the file is read
    from raydet.interop import convert_checkpoint

    rgb = ROOT / "pipelines" / "zoo" / "torchvision" / "fasterrcnn_resnet50_fpn.yaml"
    src, out = tmp_path / "model_final_b275ba.pkl", tmp_path / "out.pt"
    _write_pkl(src, {"pixel_mean": torch.tensor(BGR_MEAN).view(3, 1, 1), "pixel_std": torch.ones(3, 1, 1)})
    with pytest.raises(ConversionError, match=r"normalised with pixel_mean \[103\.53, 116\.28, 123\.675\] .*but the "
                                              r"pipeline's Normalize has mean \[123\.675, 116\.28, 103\.53\]"):
        convert_checkpoint(src, out, source_format="detectron2", pipeline=rgb)
    assert not out.exists()
    check_normalization({"pixel_mean": torch.tensor(BGR_MEAN).view(3, 1, 1)},
                        pipeline_normalization(load_config(ZOO / "faster_rcnn_R_50_FPN_1x.yaml")), "x")


# ------------------------------------------------------------------------------------------------------------------
# The option the Detectron2 pipelines add


def test_detectron2_level_mapping_is_detectron2s_pooler_formula():
    """Detectron2's ROIPooler: level = floor(4 + log2(sqrt(area) / 224 + 1e-8)) clamped to [2, 5], minus 2 (computed
    here as written there). Square RoIs of sides 2 float32 steps below 112, 224 and 448 px, and on them: Detectron2's
    float32 sum 4 + log2(...) rounds the first up to level 1 but not the others; MMDetection's 1e-6 lifts all three."""
    from raydet.models.roi_heads.roi_extractors import SingleRoIExtractor, map_roi_levels

    sides = torch.tensor([112 - 1.6e-5, 112.0, 224 - 3.2e-5, 224.0, 448 - 6.4e-5, 448.0, 20.0, 2000.0])
    zeros = torch.zeros_like(sides)
    rois = torch.stack([zeros, zeros, zeros, sides, sides], 1)
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    detectron2 = (torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)).clamp(2, 5) - 2).long()
    assert detectron2.tolist() == [1, 1, 1, 2, 3, 3, 0, 3]
    assert map_roi_levels(rois, 4, mapping="detectron2", first_level=2).tolist() == detectron2.tolist()
    assert map_roi_levels(rois, 4, 56.0).tolist() == [1, 1, 2, 2, 3, 3, 0, 3]
    # the extractor passes its finest level (log2 of its first stride); a pooler over p3..p5 starts at level 3
    assert map_roi_levels(rois, 3, mapping="detectron2", first_level=3).tolist() == [0, 0, 0, 1, 2, 2, 0, 2]
    # the extractor pools each RoI from that level: maps of constant value = level index, RoIs inside a 512 px image
    extractor = SingleRoIExtractor(2, [4, 8, 16, 32], level_mapping="detectron2")
    feats = tuple(torch.full((1, 1, 512 // s, 512 // s), float(i)) for i, s in enumerate([4, 8, 16, 32]))
    pooled = extractor(feats, rois[:7])
    assert pooled.mean(dim=(1, 2, 3)).tolist() == detectron2[:7].float().tolist()
    with pytest.raises(ValueError, match="level_mapping must be 'mmdetection' or 'detectron2'"):
        SingleRoIExtractor(7, [4, 8, 16, 32], level_mapping="fpn")


def test_resize_pillow_backend_interpolates_as_pillow():
    """Detectron2 resizes uint8 images with Pillow's bilinear filter; OpenCV's INTER_LINEAR gives other pixels."""
    from PIL import Image

    from raydet.data.transforms import Resize

    image = np.random.default_rng(0).integers(0, 256, (96, 72, 3)).astype(np.uint8)
    sample = {"image": image, "boxes": np.array([[8.0, 10.0, 40.0, 60.0]], np.float32),
              "ignore_boxes": np.zeros((0, 4), np.float32)}
    out = Resize([1333, 800], backend="pillow")(sample, np.random.default_rng(0))
    # short side 72 -> 800 (factor 11.11), long side 96 -> 1066.67, rounded half up to 1067 (<= 1333)
    assert out["img_shape"] == (1067, 800)
    expected = np.asarray(Image.fromarray(image).resize((800, 1067), Image.Resampling.BILINEAR))
    assert np.array_equal(out["image"], expected)
    shrunk = Resize([40, 30], backend="pillow")(sample, np.random.default_rng(0))["image"]
    assert np.array_equal(shrunk, np.asarray(Image.fromarray(image).resize((30, 40), Image.Resampling.BILINEAR)))
    assert not np.array_equal(shrunk, Resize([40, 30])(sample, np.random.default_rng(0))["image"])
    with pytest.raises(ValueError, match="backend must be 'cv2' or 'pillow'"):
        Resize([1333, 800], backend="pil")
