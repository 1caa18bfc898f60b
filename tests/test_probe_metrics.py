"""Probe and zero-shot metrics and losses against values worked out by hand on tiny arrays."""
import json
import math

import pytest
import torch

from probe.losses import angmf_nll_loss, ssi_loss
from probe.metrics import (DepthMetric, NormalMetric, SegMetric, TopKMetric, align_scale_shift, angular_error_deg,
                           depth_valid_mask, disparity_to_depth, retrieval_recall)


# ---- segmentation -----------------------------------------------------------------------------------

def test_miou_leaves_out_absent_classes_and_ignored_pixels():
    # 4 classes, 255 = ignore. Class 2 is predicted only on the ignored pixel: absent (empty union).
    target = torch.tensor([[0, 0, 1, 255], [1, 1, 3, 3]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 0, 3, 0]])
    m = SegMetric(4, ignore_index=255)
    m.update(pred, target)
    r = m.compute(["bg", "a", "b", "c"])
    # pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (1,0) (3,3) (3,0)
    # IoU0 = 1 / (1 + 1 FN + 2 FP) = 0.25; IoU1 = 2 / (2 + 1 + 1) = 0.5; IoU3 = 1 / (1 + 1) = 0.5
    assert r["per_class_IoU"] == {"bg": 25.0, "a": 50.0, "b": None, "c": 50.0}
    assert r["mIoU"] == pytest.approx(100 * (0.25 + 0.5 + 0.5) / 3)
    assert r["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert r["num_classes_present"] == 3

    # whatever is predicted on an ignored pixel changes nothing; split updates add up
    m2 = SegMetric(4, ignore_index=255)
    m2.update(torch.tensor([[0, 1, 1, 3]]), target[:1])
    m2.update(pred[1:], target[1:])
    assert m2.compute()["mIoU"] == pytest.approx(r["mIoU"])


def test_miou_counts_a_ground_truth_class_that_is_never_predicted_as_zero():
    target = torch.tensor([0, 0, 2, 2])
    pred = torch.tensor([0, 0, 0, 0])
    m = SegMetric(3)
    m.update(pred, target)
    r = m.compute()
    # IoU0 = 2 / 4, IoU2 = 0 (in the ground truth, never predicted), class 1 absent
    assert r["per_class_IoU"] == {"0": 50.0, "1": None, "2": 0.0}
    assert r["mIoU"] == pytest.approx(25.0)


def test_seg_labels_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match="outside"):
        SegMetric(3).update(torch.tensor([0, 1]), torch.tensor([0, 7]))


# ---- depth ------------------------------------------------------------------------------------------

def test_absrel_and_deltas_over_valid_pixels_averaged_over_images():
    nan = float("nan")
    gt = torch.tensor([[[1.0, 2.0, 0.0], [4.0, nan, 20.0]]])      # 0, NaN and 20 m (> max 10 m) are invalid
    pred = torch.tensor([[[1.5, 1.0, 7.0], [2.0, 5.0, 3.0]]])
    valid = depth_valid_mask(gt, 1e-3, 10.0)
    assert valid.tolist() == [[[True, True, False], [True, False, False]]]
    m = DepthMetric()
    m.update(pred, gt, valid)
    # valid pairs (d, g): (1.5, 1) (1, 2) (2, 4): |d-g|/g = 0.5 each; max ratios 1.5, 2, 2
    one = m.compute()
    assert one["AbsRel"] == pytest.approx(0.5)
    assert one["delta1"] == 0.0                                   # none < 1.25
    assert one["delta2"] == pytest.approx(100 / 3)                # 1.5 < 1.5625
    assert one["delta3"] == pytest.approx(100 / 3)                # 2 > 1.953
    assert one["RMSE"] == pytest.approx(math.sqrt((0.25 + 1 + 4) / 3))
    # a second image (AbsRel 0.1) and one without any valid pixel (skipped, counted)
    m.update(torch.tensor([[2.2]]), torch.tensor([[2.0]]), torch.tensor([[True]]))
    m.update(torch.tensor([[5.0]]), torch.tensor([[0.0]]), torch.tensor([[False]]))
    two = m.compute()
    assert two["AbsRel"] == pytest.approx((0.5 + 0.1) / 2)
    assert two["delta1"] == pytest.approx(50.0)
    assert two["num_images"] == 2 and two["images_without_valid_depth"] == 1


def test_disparity_alignment_recovers_depth_and_caps_far_predictions():
    gt = torch.tensor([[[1.0, 2.0, 4.0], [0.0, 5.0, 8.0]]])
    valid = gt > 0
    disp = torch.where(valid, 3.0 / gt.clamp_min(1e-6) + 0.5, torch.tensor(-100.0))  # any scale and shift
    depth = disparity_to_depth(disp, gt, valid, max_depth=10.0)
    torch.testing.assert_close(depth[valid], gt[valid].double())
    assert depth[0, 1, 0].item() == pytest.approx(10.0)  # aligned disparity < 1/10 is capped at 10 m
    s, t = align_scale_shift(disp.double(), torch.where(valid, 1 / gt.double().clamp_min(1e-6), 0.0), valid)
    assert s.item() == pytest.approx(1 / 3) and t.item() == pytest.approx(-0.5 / 3)


def test_ssi_loss_by_hand():
    gt = torch.tensor([[[1.0, 0.5, 0.25, 0.0]]])                  # disparities 1, 2, 4; the last pixel invalid
    valid = gt > 0
    pred = torch.tensor([[[0.0, 1.0, 2.0, 99.0]]], requires_grad=True)
    # least squares: s = cov / var = 3 / 2, t = 7/3 - 1.5 -> fitted 0.8333, 2.3333, 3.8333
    loss = ssi_loss(pred, gt, valid)
    assert loss.item() == pytest.approx((1 / 6 + 1 / 3 + 1 / 6) / 3, rel=1e-5)
    loss.backward()
    assert pred.grad[0, 0, 3] == 0 and pred.grad.abs().sum() > 0
    exact = ssi_loss(torch.tensor([[[5.0, 9.0, 17.0, 0.0]]]), gt, valid)  # 4 * disparity + 1
    assert exact.item() == pytest.approx(0.0, abs=1e-5)


# ---- surface normals ------------------------------------------------------------------------------------

def _unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.sin(r), 0.0, math.cos(r)]


def test_angular_error_is_exact_at_the_poles():
    z = torch.tensor([[0.0, 0.0, 1.0]] * 5).t()[None, :, :, None]  # (1, 3, 5, 1)
    other = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -2.0], [1.0, 0.0, 0.0], _unit(1e-4 * 180 / math.pi),
                          [0.0, 0.0, 0.5]]).t()[None, :, :, None]
    err = angular_error_deg(z, other)[0, :, 0]
    assert err[0].item() == 0.0 and err[4].item() == 0.0          # identical (any length): exactly 0
    assert err[1].item() == 180.0                                 # antipodal: exactly 180
    assert err[2].item() == pytest.approx(90.0, abs=1e-12)
    assert err[3].item() == pytest.approx(1e-4 * 180 / math.pi, rel=1e-6)  # 1e-4 rad; acos(float32 cos) gives 0


def test_normal_metric_mean_median_and_thresholds():
    angles = [0.0, 90.0, 180.0, 20.0, 25.0, 3.0]
    gt = torch.tensor([[0.0, 0.0, 1.0]] * 6).t().reshape(1, 3, 2, 3)
    pred = torch.tensor([_unit(a) for a in angles]).t().reshape(1, 3, 2, 3)
    valid = torch.tensor([[[True, True, True], [True, True, False]]])  # the 3-degree pixel is invalid
    m = NormalMetric()
    m.update(pred, gt, valid)
    r = m.compute()
    assert r["mean"] == pytest.approx((0 + 90 + 180 + 20 + 25) / 5)
    assert r["median"] == pytest.approx(25.0, abs=0.005)          # sorted 0, 20, 25, 90, 180
    assert r["a<11.25"] == pytest.approx(20.0) and r["a<22.5"] == pytest.approx(40.0) and r["a<30"] == pytest.approx(60.0)
    m.update(pred[..., :1, :1], gt[..., :1, :1], valid[..., :1, :1])  # one more 0-degree pixel: even count
    assert m.compute()["median"] == pytest.approx((20 + 25) / 2, abs=0.005)


def test_angmf_nll_by_hand():
    kappa = 2.0
    pred = torch.tensor([_unit(60.0) + [kappa], [0.0, 0.0, 1.0, 5.0]]).t().reshape(1, 4, 1, 2)
    gt = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]).t().reshape(1, 3, 1, 2)
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    # the second pixel matches exactly (cos > 0.999): left out, as in the official code
    want = -math.log(kappa ** 2 + 1) + kappa * math.pi / 3 + math.log(1 + math.exp(-kappa * math.pi))
    assert angmf_nll_loss(pred, gt, valid).item() == pytest.approx(want, rel=1e-5)


# ---- ranking ------------------------------------------------------------------------------------------

def test_recall_with_ties_counts_a_tied_wrong_candidate_ahead():
    # 3 images, 4 texts; image 0 owns texts 0 and 1
    sim = torch.tensor([[0.9, 0.1, 0.9, 0.0],
                        [0.2, 0.3, 0.5, 0.5],
                        [0.9, 0.2, 0.3, 0.95]])
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(sim, owner, (1, 2, 5))
    # image -> text: image 0's best own text (0.9) ties wrong text 2; image 1's (0.5) ties text 3;
    # image 2's 0.95 is first. -> R@1 1/3, R@2 all.
    assert r["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert r["image_to_text_R@2"] == 100.0 and r["image_to_text_R@5"] == 100.0
    # text -> image: text 0 ties image 2 (second), text 1 is third, text 2 second behind image 0,
    # text 3 first -> R@1 1/4, R@2 3/4, R@5 4/4
    assert r["text_to_image_R@1"] == pytest.approx(25.0)
    assert r["text_to_image_R@2"] == pytest.approx(75.0)
    assert r["text_to_image_R@5"] == 100.0
    # the order of the candidates does not matter
    perm = torch.tensor([3, 1, 0, 2])
    assert retrieval_recall(sim[:, perm], owner[perm], (1, 2, 5)) == r


def test_topk_with_ties_and_fewer_classes_than_k():
    logits = torch.tensor([[1.0, 2, 3, 4, 5, 6],
                           [1.0, 1, 1, 1, 1, 1],      # all tied: five wrong classes count ahead
                           [5.0, 9, 8, 7, 6, 0],      # label 0 is fifth
                           [0.0, 9, 8, 7, 6, 5]])     # label 0 is last
    labels = torch.tensor([5, 0, 0, 0])
    m = TopKMetric((1, 5))
    m.update(logits, labels)
    r = m.compute()
    assert r["top1"] == pytest.approx(25.0) and r["top5"] == pytest.approx(50.0) and r["num_images"] == 4
    few = TopKMetric((1, 5))
    few.update(torch.tensor([[0.1, 0.3, 0.2]]), torch.tensor([0]))  # 3 classes: top-5 always holds
    assert few.compute() == {"top1": 0.0, "top5": 100.0, "num_images": 1}


# ---- configuration (Table 9) and the gathered tables ------------------------------------------------

# Table 9 of the paper: (epochs, warmup steps, warmup init LR, max LR, min LR, batch size)
TABLE9 = {"seg": (50, 500, 1e-6, 3e-5, 3e-6, 32), "depth": (50, 1000, 1e-6, 1e-4, 1e-6, 16),
          "normal": (50, 1000, 1e-6, 1e-5, 1e-6, 16), "cls": (40, 1000, 1e-6, 3e-5, 1e-6, 128)}


@pytest.mark.parametrize("task", list(TABLE9))
def test_probe_defaults_are_table9_and_overrides_use_the_trainer_syntax(task):
    from probe.config import HEADS, ConfigError, load_probe_config

    for head in HEADS[task]:
        c = load_probe_config(task, head)
        assert (c.optim.epochs, c.optim.warmup_steps, c.optim.warmup_init_lr, c.optim.lr, c.optim.min_lr,
                c.data.batch_size) == TABLE9[task], head
    c = load_probe_config(task, "linear", "smoke", overrides=["optim.lr=5e-1", "head.channels=8", "data.scale_range=[1, 1]"])
    assert c.optim.lr == 0.5 and c.head_cfg.channels == 8 and c.data.scale_range == [1, 1] and c.data.crop_size == 96
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_probe_config(task, "linear", overrides=["optim.lrr=1"])


def _record(path, task, head, dataset, value, tasks, source, metric):
    path.mkdir(parents=True)
    key = {"seg": "mIoU", "depth": "AbsRel", "normal": "a<30", "cls": "top1"}[task]
    (path / "metrics.json").write_text(json.dumps({
        "task": task, "head": head, "dataset": dataset, "metric": key, "value": value, "metrics": {key: value, **metric},
        "encoder": {"source": source, "name": source.split("/")[-1], "tasks": tasks}}))


def test_table_places_runs_in_table5_rows_and_columns(tmp_path):
    from probe.table import load_runs, render

    r8, r1, clip = "runs/all3", "runs/clipft", "openai"
    _record(tmp_path / "a", "seg", "linear", "voc2012", 73.43, ["seg", "depth", "normal"], r8, {})
    _record(tmp_path / "b", "seg", "pspnet", "voc2012", 80.71, ["seg", "depth", "normal"], r8, {})
    _record(tmp_path / "c", "depth", "linear", "nyuv2", 0.159, ["normal", "depth", "seg"], r8, {})
    _record(tmp_path / "d", "normal", "pspnet", "nyuv2", 50.49, ["seg", "depth", "normal"], r8, {})
    _record(tmp_path / "e", "seg", "linear", "voc2012", 62.47, [], r1, {})
    _record(tmp_path / "f", "seg", "linear", "ade20k", 26.60, [], r1, {})
    _record(tmp_path / "g", "depth", "pspnet", "nyuv2", 0.168, None, clip, {})
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "metrics.json").write_text(json.dumps({"task": "zeroshot_cls", "dataset": "imagenet", "metrics": {
        "top1": 68.25, "top5": 90.0}, "encoder": {"source": r8, "name": "all3", "tasks": ["seg", "depth", "normal"]}}))
    text = render(load_runs([tmp_path]))
    table5 = text.split("### ")[1]
    assert table5.startswith("Table 5")
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in table5.splitlines()
            if line.startswith("| R") or line.startswith("| openai")}
    # columns: row, 3 experts, seg linear, seg pspnet, det x2, depth linear, depth pspnet, normal linear, normal pspnet
    assert rows["R8"] == ["R8", "✓", "✓", "✓", "73.43", "80.71", "n/a", "n/a", "0.159", "–", "–", "50.49"]
    assert rows["R1"][:6] == ["R1", "×", "×", "×", "62.47", "–"]
    assert rows["openai"][1:4] == ["?", "?", "?"] and rows["openai"][9] == "0.168"
    assert "Table 10" in text and "| R1 | × | × | × | 26.60 | – |" in text
    assert "Table 4" in text and "68.25" in text
    assert table5.index("| R1 |") < table5.index("| R8 |") < table5.index("| openai |")
    assert "| R8 | voc2012 | seg | pspnet | mIoU | 80.71 |" in text  # the list of all runs
