"""Trainer pieces on real files: config, strict key join, joint augmentation, losses, fail-fast weights."""
import io
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import labels as L
from pipeline.shards import iter_records
from pipeline.storage import write_tar_atomic
from tests.guards import NoHostSync
from trainer import data as D
from trainer import losses, params


# ---- config --------------------------------------------------------------------------------------

def test_default_config_is_table8():
    cfg = params.load_config("default")
    o, lo, d = cfg.optim, cfg.loss, cfg.data
    assert (o.epochs, o.warmup_steps, o.warmup_init_lr, o.lr, o.min_lr) == (30, 1000, 1e-6, 3e-5, 1e-6)
    assert (lo.clip, lo.seg, lo.depth, lo.normal) == (1.0, 0.1, 1.0, 1.0)
    assert (d.batch_size, d.base_resolution) == (32, 512)
    assert cfg.tasks == ["seg", "depth", "normal"] and cfg.model.head_layers == 1


def test_overrides_and_errors(tmp_path):
    cfg = params.load_config("smoke", overrides=["optim.lr=0.5", "tasks=[normal, seg]", "model.head_layers=3"])
    assert cfg.optim.lr == 0.5 and cfg.tasks == ["seg", "normal"] and cfg.model.head_layers == 3
    with pytest.raises(params.ConfigError, match="optim.lrr"):
        params.load_config("smoke", overrides=["optim.lrr=1"])
    with pytest.raises(params.ConfigError, match="head_layers"):
        params.load_config("smoke", overrides=["model.head_layers=2"])
    with pytest.raises(params.ConfigError, match="unknown task"):
        params.parse_tasks("seg,albedo")
    assert params.parse_tasks("none") == [] and params.parse_tasks("all") == ["seg", "depth", "normal"]
    own = tmp_path / "mine.yaml"
    own.write_text(f"base: {params.CONFIG_DIR / 'smoke.yaml'}\ntasks: [depth]\nloss: {{depth: 2.5}}\n")
    cfg = params.load_config(config=str(own))
    assert cfg.tasks == ["depth"] and cfg.loss.depth == 2.5 and cfg.model.arch == "CLIPTeX-Tiny-ViT"


def test_variable_batch_pairs_keep_pixels_constant():
    pairs = D.image_batch_pairs(512, 256, 768, 5, 32, 32)
    assert (512, 512, 32) in pairs and len(pairs) == 5
    for h, w, b in pairs:
        assert h % 32 == 0 and w % 32 == 0
        assert 0.75 <= h * w * b / (512 * 512 * 32) <= 1.0
    shapes = {D.step_shape(pairs, 0, s) for s in range(200)}
    assert len(shapes) == 5  # every scale is used
    assert D.step_shape(pairs, 0, 17) == D.step_shape(pairs, 0, 17)  # same on every rank


# ---- strict join by key --------------------------------------------------------------------------

def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _keys(shard):
    return [r.key for r in iter_records(shard) if hasattr(r, "members")]


def test_join_skips_and_counts_every_mismatch(sample_dir, smoke_labels, tmp_path):
    shard = sorted(Path(sample_dir).glob("*.tar"))[0]
    keys = _keys(shard)
    assert len(keys) >= 8
    root = tmp_path / "labels"
    shutil.copytree(smoke_labels, root)
    # depth: two keys lost
    depth = [(n, b) for n, b in _members(root / "depth" / shard.name) if L.split_member_name(n)[0] not in keys[1:3]]
    write_tar_atomic(root / "depth" / shard.name, depth)
    # seg: one member renamed to a key the source does not have (a mismatch: missing + orphan)
    seg = [((n.replace(keys[4], "zzzzzzzzz") if n.startswith(keys[4] + ".") else n), b)
           for n, b in _members(root / "seg" / shard.name)]
    write_tar_atomic(root / "seg" / shard.name, seg)
    # normal: a short shard (truncated after 5 keys) must not truncate the stream silently
    normal = [(n, b) for n, b in _members(root / "normal" / shard.name) if L.split_member_name(n)[0] in keys[:5]]
    write_tar_atomic(root / "normal" / shard.name, normal)

    tars = {t: str(root / t / shard.name) for t in ("seg", "depth", "normal")}
    items = list(D.join_shard(str(shard), tars, D.TASK_KINDS))
    recs = [i for i in items if isinstance(i, dict)]
    counts = {}
    for i in items:
        if isinstance(i, tuple):
            counts[i[1]] = counts.get(i[1], 0) + 1
    bad = set(keys[1:3]) | {keys[4]} | set(keys[5:])
    assert [r["key"] for r in recs] == [k for k in keys if k not in bad]
    assert counts == {"missing_depth": 2, "missing_seg": 1, "extra_seg": 1,
                      "missing_normal": len(keys) - 5, "samples_skipped": len(bad)}
    stored = {t: dict(_members(root / t / shard.name)) for t in tars}
    for r in recs:  # every kept record carries exactly its own key's label bytes
        assert set(r["labels"]) == set(tars)
        for t, kinds in r["labels"].items():
            for kind, b in kinds.items():
                assert b == stored[t][f"{r['key']}.{kind}.lbl"]

    # only selected trees: without normal the same shard loses fewer samples
    items = list(D.join_shard(str(shard), {"seg": tars["seg"]}, D.TASK_KINDS))
    assert [i["key"] for i in items if isinstance(i, dict)] == [k for k in keys if k != keys[4]]


def test_join_survives_a_truncated_source(sample_dir, smoke_labels, tmp_path):
    shard = sorted(Path(sample_dir).glob("*.tar"))[0]
    cut = tmp_path / shard.name
    data = shard.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    tars = {"seg": str(Path(smoke_labels) / "seg" / shard.name)}
    items = list(D.join_shard(str(cut), tars, D.TASK_KINDS))
    n_rec = sum(isinstance(i, dict) for i in items)
    reasons = [i[1] for i in items if isinstance(i, tuple)]
    assert 0 < n_rec < len(_keys(shard))
    assert "truncated_tar" in reasons  # the damage is reported, not silently a shorter shard
    assert reasons.count("extra_seg") >= len(_keys(shard)) - n_rec - 1  # labels of the lost samples counted


# ---- one geometric augmentation for image and labels ---------------------------------------------

def _record(H=200, W=300):
    img = np.zeros((H, W, 3), np.uint8)
    img[:, : W // 3] = (255, 0, 0)          # red left third
    img[:, W // 3:] = (0, 0, 255)           # blue right
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    lh, lw = L.label_shape((H, W), 0.5)
    seg = np.full((lh, lw), 2, np.uint8)
    seg[:, : lw // 3] = 1
    depth = np.tile(np.arange(lw, dtype=np.float32), (lh, 1))       # = label column
    normal = np.broadcast_to(np.float32([0.6, 0, -0.8]), (lh, lw, 3)).copy()
    enc = L.encode_sample("k", {"seg": seg, "depth": depth, "normal": normal}, (H, W))
    return {"key": "k", "img": buf.getvalue(), "txt": b"a red and blue picture",
            "labels": {t: {L.split_member_name(n)[1]: b for n, b in m.items()} for t, m in enc.items()}}


def test_same_crop_and_flip_on_image_and_labels():
    rec = _record()
    flips = 0
    for seed in range(24):
        rng = random.Random(seed)
        s = D.load_sample(rec, 64, 96, 32, 48, rng, D.TASK_KINDS, crop_scale=(0.3, 1.0), hflip=0.5)
        img, seg, depth, normal = s["image"], s["seg"], s["depth"], s["normal"]
        assert img.shape == (64, 96, 3) and seg.shape == depth.shape == (32, 48) and normal.shape == (32, 48, 3)
        normal = normal.transpose(2, 0, 1)
        red = img[1::2, 1::2, 0] > img[1::2, 1::2, 2]                # image at the label pixels' centres
        agree = (red == (seg == 1)).mean()
        assert agree > 0.93, (seed, agree)                           # only the boundary column may differ
        step = np.diff(depth.mean(0))
        flipped = step.sum() < 0
        flips += flipped
        assert (step <= 0).all() if flipped else (step >= 0).all()   # depth follows x (reversed if flipped)
        assert np.abs(step).sum() > 10                               # and spans the crop, not a constant
        assert np.allclose(normal[0], -0.6 if flipped else 0.6, atol=0.02)  # flip negates x
        assert np.allclose(normal[2], -0.8, atol=0.02)
        assert set(np.unique(seg)) <= {1, 2}                         # nearest: no invented classes
    assert 4 <= flips <= 20


def test_wire_codes_give_the_same_values_on_the_device():
    """The loader ships uint16 codes; labels_to_values must rebuild exactly what load_sample's
    float path gives (same crop, same flip)."""
    rec = _record()
    kinds = {"seg": ["seg"], "depth": ["depth"], "normal": ["normal"]}
    for seed in range(6):
        values = D.load_sample(rec, 64, 96, 32, 48, random.Random(seed), kinds, hflip=0.5)
        codes = D.load_sample(rec, 64, 96, 32, 48, random.Random(seed), kinds, hflip=0.5, as_codes=True)
        assert codes["depth"].dtype == np.uint16 and codes["normal"].shape == (32, 48)
        batch = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v)[None])) for k, v in codes.items()
                 if k not in ("caption", "image")}
        got = D.labels_to_values(batch, ["seg", "depth", "normal"], torch.device("cpu"))
        for kind in ("seg", "depth", "normal"):
            assert torch.equal(got[kind][0], torch.from_numpy(np.ascontiguousarray(values[kind]))), (seed, kind)


def test_nearest_index_is_floor_of_the_pixel_centres():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        n_in, n_out = int(rng.integers(1, 600)), int(rng.integers(1, 600))
        lo = float(rng.uniform(-3, n_in)) if rng.random() < 0.2 else float(rng.uniform(0, n_in))
        hi = lo + float(rng.uniform(0, 1.3 * n_in))
        if rng.random() < 0.2:  # exact pixel edges, where rounding decides
            lo, hi = float(int(lo)), float(int(hi) + 1)
        want = np.clip(np.floor(lo + (np.arange(n_out) + 0.5) * ((hi - lo) / n_out)).astype(np.intp), 0, n_in - 1)
        flip = bool(rng.random() < 0.5)
        got = D.nearest_index(lo, hi, n_out, n_in, reverse=flip)
        assert got.dtype == np.intp and np.array_equal(got, want[::-1] if flip else want), (lo, hi, n_out, n_in)


def test_cropped_labels_equal_full_decode_then_crop():
    """load_sample decodes only the crop's window of each map; what it returns must equal the plain
    way: decode the whole map, gather the crop's nearest pixels, flip, convert."""
    rng = np.random.default_rng(0)
    H, W = 90, 130
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (H, W, 3)).astype(np.uint8)).save(buf, format="PNG")
    kinds = {"seg": ["seg"], "depth": ["depth"], "normal": ["normal", "normal_conf"]}
    for lH, lW in [(45, 65), (90, 130), (17, 23)]:
        v = rng.normal(size=(lH, lW, 3))
        maps = {"seg": rng.integers(0, 81, (lH, lW)).astype(np.uint8),  # noise: any misplaced pixel shows
                "depth": rng.random((lH, lW)).astype(np.float32) * 50,
                "normal": v / np.linalg.norm(v, axis=-1, keepdims=True),
                "normal_conf": rng.random((lH, lW)).astype(np.float32)}
        enc = L.encode_sample("k", maps, (H, W))
        rec = {"key": "k", "img": buf.getvalue(), "txt": b"noise",
               "labels": {t: {L.split_member_name(n)[1]: b for n, b in m.items()} for t, m in enc.items()}}
        full = {k: L.decode_codes(enc[L.task_of(k)][L.member_name("k", k)]) for k in maps}
        for seed in range(12):
            h, w, lh, lw = [(64, 96, 32, 48), (32, 32, 16, 16), (128, 96, 64, 48)][seed % 3]
            for as_codes in (False, True):
                got = D.load_sample(rec, h, w, lh, lw, random.Random(seed), kinds, crop_scale=(0.2, 1.0),
                                    hflip=0.5, as_codes=as_codes)
                r = random.Random(seed)  # load_sample's draws, in its order
                box = D.rrc_box(H, W, h, w, (0.2, 1.0), (0.75, 4 / 3), r)
                flip = r.random() < 0.5
                rows = D.nearest_index(box[1] * lH / H, box[3] * lH / H, lh, lH)
                cols = D.nearest_index(box[0] * lW / W, box[2] * lW / W, lw, lW, reverse=flip)
                for kind, (header, codes) in full.items():
                    y = codes[rows][:, cols]
                    if kind == "normal" and flip:
                        y = y ^ np.uint16(255)
                    want = y if as_codes and kind != "seg" else L.values_from_codes(header, y)
                    assert got[kind].dtype == want.dtype and np.array_equal(got[kind], want), (lH, seed, kind)
        # the same through preallocated batch slots (what make_batch does)
        slot = {"image": np.empty((32, 48, 3), np.uint8), "seg": np.empty((16, 24), np.uint8),
                "depth": np.empty((16, 24), np.uint16), "normal": np.empty((16, 24), np.uint16),
                "normal_conf": np.empty((16, 24), np.uint16)}
        for seed in range(6):
            want = D.load_sample(rec, 32, 48, 16, 24, random.Random(seed), kinds, as_codes=True)
            got = D.load_sample(rec, 32, 48, 16, 24, random.Random(seed), kinds, out=slot, as_codes=True)
            for kind in maps:
                assert got[kind] is slot[kind] and np.array_equal(slot[kind], want[kind]), (seed, kind)


def test_loader_batch_is_one_block_equal_to_the_in_process_batch(sample_dir, smoke_labels):
    """Through a DataLoader worker the batch's arrays arrive as views of one shared block (one
    storage to hand over, not one per array) and hold exactly what the stream makes in-process."""
    cfg = params.load_config("default", overrides=["data.batch_size=4", "data.shuffle_buffer=8",
                                                   "data.shuffle_initial=4"])
    _, shards, _, _ = D.resolve_shards(str(sample_dir))
    tasks = ["seg", "depth", "normal"]
    shards, label_tars, _ = D.label_files(Path(smoke_labels), tasks, shards)

    def stream():
        return D.TrainStream(shards, label_tars, tasks, cfg.data, seed=0, rank=0, world_size=1, num_streams=1)

    direct, loader = iter(stream()), iter(D.make_loader(stream(), num_workers=1, pin_memory=False))
    arrays = ["image", "seg", "depth", "normal", "depth_lo", "depth_scale"]
    for _ in range(3):
        a, b = next(direct), next(loader)
        assert a["step"] == b["step"] and torch.equal(a["text"], b["text"])
        for k in arrays:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k].numpy(), b[k].numpy()), k
        assert b["seg"].shape[1:] == b["depth"].shape[1:] == b["normal"].shape[1:]
        assert len({b[k].untyped_storage().data_ptr() for k in arrays}) == 1
    del loader


def test_label_for_another_image_is_rejected():
    rec = _record()
    other = _record(H=220, W=300)   # labels claim another image size
    rec["labels"]["depth"] = other["labels"]["depth"]
    with pytest.raises(D.SampleError, match="bad_depth"):
        D.load_sample(rec, 64, 64, 32, 32, random.Random(0), D.TASK_KINDS)


# ---- losses --------------------------------------------------------------------------------------

def test_losses():
    logits = torch.zeros(2, 81, 4, 4)
    target = torch.full((2, 4, 4), 255, dtype=torch.uint8)
    assert losses.seg_loss(logits, target).item() == 0.0           # all ignored: 0, not NaN
    target[0, 0, 0] = 3
    assert losses.seg_loss(logits, target).item() == pytest.approx(np.log(81), rel=1e-5)
    d = torch.rand(2, 5, 5) * 7 + 3
    t = losses.normalise_depth(d, torch.ones_like(d, dtype=torch.bool))
    t2 = losses.normalise_depth(d * 40 + 11, torch.ones_like(d, dtype=torch.bool))  # scale/shift invariant
    torch.testing.assert_close(t, t2, rtol=1e-4, atol=1e-4)
    assert losses.depth_loss(t[:, None], d).item() < 1e-5
    n = torch.nn.functional.normalize(torch.randn(2, 3, 5, 5), dim=1)
    assert losses.normal_loss(n, n).item() == 0.0
    assert losses.normal_loss(-n, n, kappa=torch.rand(2, 5, 5) + 0.1).item() > 0


def test_kappa_weighted_normal_loss_by_hand():
    """Each pixel's L1 weighted by kappa / (its image's mean kappa over valid pixels), summed over
    valid pixels / their count; and an objective told to weight by kappa needs the kappa map."""
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 3, 4, 5, generator=g), torch.nn.functional.normalize(torch.randn(2, 3, 4, 5, generator=g), dim=1)
    target[1, :, 0] = 0.0  # a row without a normal
    kappa = torch.rand(2, 4, 5, generator=g) * 30
    p, t, k = pred.double().numpy(), target.double().numpy(), kappa.double().numpy()
    total, count = 0.0, 0
    for b in range(2):
        valid = [(y, x) for y in range(4) for x in range(5) if np.abs(t[b, :, y, x]).sum() > 0]
        mean_k = sum(k[b, y, x] for y, x in valid) / len(valid)
        for y, x in valid:
            total += k[b, y, x] / mean_k * np.abs(p[b, :, y, x] - t[b, :, y, x]).mean()
        count += len(valid)
    assert losses.normal_loss(pred, target, kappa).item() == pytest.approx(total / count, rel=1e-5)
    assert losses.normal_loss(pred, target).item() != pytest.approx(total / count, rel=1e-3)
    crit = losses.CLIPTeXLoss({"clip": 1.0, "normal": 1.0}, ["normal"], kappa_weight=True)
    with pytest.raises(KeyError, match="normal_conf"):
        crit.dense({"normal": pred}, {"normal": target})
    assert crit.dense({"normal": pred}, {"normal": target, "normal_conf": kappa})["normal"].item() == pytest.approx(total / count, rel=1e-5)



# The formulation the losses had before they were made sync-free (one host sync per term, boolean-mask
# indexing, heads upsampled to the label size before the loss): the reference the new one must equal.
def _old_seg(logits, target):
    logits = torch.nn.functional.interpolate(logits, size=target.shape[-2:], mode="nearest")
    target = target.long()
    n = int((target != 255).sum())
    if n == 0:
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=255, reduction="sum") / n


def _old_depth(pred, depth):
    pred = torch.nn.functional.interpolate(pred, size=depth.shape[-2:], mode="nearest")
    valid = torch.isfinite(depth)
    n = int(valid.sum())
    if n == 0:
        return pred.sum() * 0.0
    target = losses.normalise_depth(torch.where(valid, depth, torch.zeros_like(depth)), valid)
    return (pred[:, 0].float() - target).abs()[valid].sum() / n


def _old_normal(pred, normal, kappa=None):
    pred = torch.nn.functional.interpolate(pred, size=normal.shape[-2:], mode="nearest")
    valid = torch.isfinite(normal).all(1) & (normal.abs().sum(1) > 0)
    n = int(valid.sum())
    if n == 0:
        return pred.sum() * 0.0
    err = (pred.float() - torch.nan_to_num(normal)).abs().mean(1)
    if kappa is not None:
        k = torch.nan_to_num(kappa).clamp_min(0) * valid
        mean = k.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
        err = err * (k / mean.clamp_min(1e-6)[:, None, None])
    return err[valid].sum() / n


@pytest.mark.parametrize("grid,size", [((4, 6), (32, 48)), ((4, 6), (7, 13)), ((5, 3), (5, 3)), ((6, 8), (3, 5))],
                         ids=["x8", "uneven", "same", "shrink"])
def test_sync_free_losses_equal_the_masked_formulation(grid, size):
    """Values and gradients equal the upsample-then-mask formulation on random inputs, including a
    batch where one image and then every image has no valid pixel."""
    g = torch.Generator().manual_seed(size[0] * 100 + size[1])
    B, (h, w), (H, W) = 3, grid, size
    for empty in ("none", "one", "all"):
        seg = torch.randint(0, 81, (B, H, W), generator=g).to(torch.uint8)
        seg[torch.rand(B, H, W, generator=g) < 0.3] = 255
        depth = torch.rand(B, H, W, generator=g) * 20 + 1
        depth[torch.rand(B, H, W, generator=g) < 0.2] = float("nan")
        normal = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
        normal[:, :, 0, 0] = 0.0                                            # "no normal" pixel
        normal[1, 2, 1:3] = float("inf")
        kappa = torch.rand(B, H, W, generator=g) * 50
        dead = slice(0, 1) if empty == "one" else slice(None) if empty == "all" else slice(0, 0)
        seg[dead], depth[dead], normal[dead] = 255, float("nan"), float("nan")
        cases = [(losses.seg_loss, _old_seg, 81, seg, ()), (losses.depth_loss, _old_depth, 1, depth, ()),
                 (losses.normal_loss, _old_normal, 3, normal, ()), (losses.normal_loss, _old_normal, 3, normal, (kappa,))]
        for new, old, c, target, extra in cases:
            pred = (torch.randn(B, c, h, w, generator=g) * 3).requires_grad_()
            want = old(pred, target, *extra)
            (want_grad,) = torch.autograd.grad(want, pred)
            got = new(pred, target, *extra)
            (got_grad,) = torch.autograd.grad(got, pred)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{new.__name__} {empty}")
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7, msg=f"{new.__name__} {empty}")
            if empty == "all":
                assert got.item() == 0.0 and not got_grad.any()
    with pytest.raises(RuntimeError, match="out of range"):  # an id beyond the head still fails loudly
        losses.seg_loss(torch.zeros(1, 81, 2, 2), torch.full((1, 4, 4), 90, dtype=torch.uint8))


def test_dense_step_makes_no_host_sync():
    """Forward (CLIP towers, PSP, heads), the full objective and backward run without a single op
    that would make the host wait for a CUDA device (GPU.md: such syncs cost ~12 ms of a 110 ms step)."""
    from trainer.model import build_model

    with NoHostSync(), pytest.raises(AssertionError, match="host wait"):  # the guard sees what it must
        x = torch.randn(4)
        x[x > 0]
    cfg = params.load_config("smoke", overrides=["model.head_layers=1"])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    model.train()
    crit = losses.CLIPTeXLoss(vars(cfg.loss), cfg.tasks, kappa_weight=True)
    g = torch.Generator().manual_seed(0)
    B, H, W = 2, 48, 48  # labels at 1/2 of the 96 px input: the heads (6x6 grid) are upsampled by 8
    batch = {"seg": torch.randint(0, 81, (B, H, W), generator=g).to(torch.uint8),
             "depth": torch.rand(B, H, W, generator=g), "normal_conf": torch.rand(B, H, W, generator=g),
             "normal": torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)}
    images, texts = torch.randn(B, 3, 96, 96, generator=g), torch.randint(1, 49000, (B, 77), generator=g)
    with NoHostSync():
        loss, terms = crit(model(images, texts), batch)
        loss.backward()
    assert set(terms) == {"clip", "seg", "depth", "normal"}
    assert model.heads["seg"].weight.grad is not None and model.psp.fuse[0].weight.grad.abs().sum() > 0



def test_compiled_dense_branch_gives_the_eager_numbers():
    """model.compile_dense: the PSP, heads and dense losses under torch.compile give the eager loss
    terms and gradients. (aot_eager: dynamo and AOT autograd trace exactly what inductor would
    compile, without generating kernels on a 2-core CPU; bench/g3_train.py measures inductor on a GPU.)"""
    import copy

    from trainer.model import build_model, compile_dense

    cfg = params.load_config("smoke")
    torch.manual_seed(0)
    eager, _, _ = build_model(cfg)
    eager.train()
    compiled = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(0)
    B, H, W = 2, 48, 48
    batch = {"seg": torch.randint(0, 81, (B, H, W), generator=g).to(torch.uint8),
             "depth": torch.rand(B, H, W, generator=g),
             "normal": torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)}
    images, texts = torch.randn(B, 3, 96, 96, generator=g), torch.randint(1, 49000, (B, 77), generator=g)
    results = []
    for model, compile_it in ((eager, False), (compiled, True)):
        crit = losses.CLIPTeXLoss(vars(cfg.loss), cfg.tasks)
        if compile_it:
            compile_dense(model, crit, backend="aot_eager")
        loss, terms = crit(model(images, texts), batch)
        loss.backward()
        results.append((terms, {n: p.grad for n, p in model.named_parameters() if n.startswith(("psp.", "heads."))}))
    (want_terms, want_grads), (got_terms, got_grads) = results
    assert "dense_heads" in vars(compiled) and "dense_heads" not in vars(eager)  # the compiled one ran
    for k in want_terms:
        torch.testing.assert_close(got_terms[k], want_terms[k], rtol=1e-5, atol=1e-6)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)

@pytest.mark.parametrize("arch", ["CLIPTeX-Tiny-ViT", "CLIPTeX-Tiny-RN"])
def test_ddp_gradients_have_the_bucket_layout(arch, tmp_path):
    """Every gradient DDP receives has its parameter's strides, so the reducer copies nothing and
    never warns "Grad strides do not match bucket view strides" (seen on an H100 for the 1x1 convs).
    On CPU oneDNN's multi-threaded convolution shows the same mismatch (one thread picks a kernel
    that does not), hence two threads here."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.model import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = params.load_config("smoke", overrides=[f"model.arch={arch}"])
        torch.manual_seed(0)
        model, _, _ = build_model(cfg)
        model.train()
        ddp = DDP(model)
        g = torch.Generator().manual_seed(0)
        B, H, W = 4, 64, 64
        batch = {"seg": torch.randint(0, 81, (B, H, W), generator=g).to(torch.uint8),
                 "depth": torch.rand(B, H, W, generator=g),
                 "normal": torch.nn.functional.normalize(torch.randn(B, H, W, 3, generator=g), dim=-1).permute(0, 3, 1, 2)}
        crit = losses.CLIPTeXLoss(vars(cfg.loss), cfg.tasks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                loss, _ = crit(ddp(torch.randn(B, 3, 128, 128, generator=g), torch.randint(1, 49000, (B, 77), generator=g)), batch)
                loss.backward()
        assert not [w for w in caught if "strides" in str(w.message)], [str(w.message)[:300] for w in caught]
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.stride() == p.stride(), (name, p.stride(), p.grad.stride())
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)

def test_offline_pretrained_tag_fails_fast(monkeypatch, tmp_path, no_network):
    from trainer.model import PretrainedUnavailable, resolve_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        path, _ = resolve_pretrained("ViT-B-16", "openai")
        pytest.skip(f"weights happen to be cached here: {path}")
    except PretrainedUnavailable:
        pass
    with pytest.raises(PretrainedUnavailable, match="--pretrained") as e:
        resolve_pretrained("ViT-B-16", "openai")
    assert no_network == []  # decided offline without probing a hub
    assert "open_clip" in str(e.value) or "huggingface.co" in str(e.value)
    with pytest.raises(PretrainedUnavailable, match="does not exist"):
        resolve_pretrained("ViT-B-16", str(tmp_path / "nope.bin"))
    with pytest.raises(PretrainedUnavailable, match="tags"):
        resolve_pretrained("ViT-B-16", "not-a-tag")
