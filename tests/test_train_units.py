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


def test_offline_pretrained_tag_fails_fast(monkeypatch, tmp_path):
    import time

    from trainer.model import PretrainedUnavailable, resolve_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        path, _ = resolve_pretrained("ViT-B-16", "openai")
        pytest.skip(f"weights happen to be cached here: {path}")
    except PretrainedUnavailable:
        pass
    t0 = time.time()
    with pytest.raises(PretrainedUnavailable, match="--pretrained") as e:
        resolve_pretrained("ViT-B-16", "openai")
    assert time.time() - t0 < 5
    assert "open_clip" in str(e.value) or "huggingface.co" in str(e.value)
    with pytest.raises(PretrainedUnavailable, match="does not exist"):
        resolve_pretrained("ViT-B-16", str(tmp_path / "nope.bin"))
    with pytest.raises(PretrainedUnavailable, match="tags"):
        resolve_pretrained("ViT-B-16", "not-a-tag")
