"""Experts' checkpoints: resolution order, the offline error path, restricted loading, and the
default profile's loaders fed with checkpoints in the official layouts (random values; nothing
is downloaded)."""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from expert_wrappers import MissingWeightsError, build_expert
from expert_wrappers import weights as W
from tests.conftest import guard_events, network_guard

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty weights cache, offline, and upstream caches pointed at empty dirs too."""
    d = tmp_path / "weights"
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(d))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return d


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def photo(h=64, w=96) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.chelsea()[:h, 100:100 + w])


# ----------------------------------------------------------------------------------------------
# resolution and the offline error


def test_offline_cli_fails_fast_with_exit_code_2_naming_every_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "CLIPTEX_"))}
    guard, events = network_guard(tmp_path)
    env.update(HF_HUB_OFFLINE="1", CLIPTEX_WEIGHTS_DIR=str(tmp_path / "w"), TORCH_HOME=str(tmp_path / "t"),
               HF_HOME=str(tmp_path / "hf"), **guard)
    p = subprocess.run([sys.executable, "-m", "expert_wrappers", "--profile", "default",
                        "--tasks", "seg,depth,normal"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    for name in ("maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", "Intel/dpt-large", "scannet.pt",
                 "drive.google.com", "weights=", "offline"):
        assert name in p.stderr, name
    assert "Traceback" not in p.stderr
    assert guard_events(events) == []  # no download attempt, no hub probe, no DNS lookup


def test_resolution_order_explicit_then_cache_then_source(cache, tmp_path, monkeypatch):
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"explicit")
    cached = cache / "sub" / "file.pth"
    downloads = []

    def fake_download(url, dest, sha256_prefix=None):
        downloads.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"downloaded")
        return dest

    for var in W.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(W, "can_reach", lambda url, timeout=0: True)
    monkeypatch.setattr(W, "download_url", fake_download)
    kw = dict(what="test", subdir="sub", url="https://example.org/file.pth")
    assert W.resolve_file("file.pth", explicit=explicit, **kw) == explicit
    assert downloads == []
    assert W.resolve_file("file.pth", **kw) == cached and downloads == [kw["url"]]  # fetched into the cache
    assert W.resolve_file("file.pth", **kw) == cached and len(downloads) == 1  # and found there next time
    with pytest.raises(MissingWeightsError, match="does not exist"):
        W.resolve_file("file.pth", explicit=tmp_path / "nope.pth", **kw)  # never falls through


def test_download_is_checked_and_atomic(tmp_path):
    src = tmp_path / "src.pth"
    src.write_bytes(os.urandom(4096))
    good = sha(src)[:8]
    dest = tmp_path / "cache" / "model-x.pth"
    with pytest.raises(RuntimeError, match="hash"):
        W.download_url(src.as_uri(), dest, "00000000" if good != "00000000" else "11111111")
    assert not dest.exists() and not list(dest.parent.iterdir())  # nothing half-written is left
    assert W.download_url(src.as_uri(), dest, good) == dest and sha(dest) == sha(src)


def test_offline_never_downloads_and_says_how_to_supply(cache, monkeypatch, no_network):
    monkeypatch.setattr(W, "download_url", lambda *a: pytest.fail("downloaded while offline"))
    monkeypatch.setattr(W, "can_reach", lambda *a, **k: pytest.fail("probed the network while offline"))
    with pytest.raises(MissingWeightsError) as e:
        W.resolve_file("x.pth", what="test expert", subdir="sub", url="https://example.org/x.pth")
    assert no_network == []
    msg = str(e.value)
    assert "x.pth" in msg and str(cache / "sub" / "x.pth") in msg and "offline" in msg


def test_unreachable_host_is_detected_quickly(monkeypatch):
    """A probe that hangs (a half-configured resolver) is given up at the timeout: can_reach
    answers while the connection attempt is still blocked."""
    import socket
    import threading

    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    assert W.can_reach("https://cliptex-weights.invalid/x", timeout=1.0) is False
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def hanging_connect(address, timeout=None, *args, **kwargs):
        started.set()
        release.wait(60)
        finished.set()
        raise OSError("released by the test")

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    try:
        assert W.can_reach("https://hangs.invalid/x", timeout=0.2) is False
        assert started.is_set() and not finished.is_set()  # it tried, and did not wait for the attempt
    finally:
        release.set()


def test_sha256_matches_and_is_remembered(cache, tmp_path):
    f = tmp_path / "ckpt.bin"
    f.write_bytes(os.urandom(1 << 20))
    assert W.sha256_file(f) == sha(f)
    assert str(f.resolve()) in (cache / "sha256-cache.json").read_text()
    W._sha_memo.clear()
    assert W.sha256_file(f) == sha(f)  # from the on-disk record
    f.write_bytes(b"changed")  # size and mtime change: hashed again
    assert W.sha256_file(f) == sha(f)


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoints_load_as_tensors_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(2)}, "iter": 3}, good)
    assert torch.equal(W.load_tensors(good)["model"]["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"model": Payload()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        W.load_tensors(bad)


def test_detectron2_pickles_are_restricted_to_numpy(tmp_path):
    from expert_wrappers.seg import load_detectron2_weights

    ok = tmp_path / "model_final.pkl"
    ok.write_bytes(pickle.dumps({"model": {"backbone.w": np.arange(4, dtype=np.float32)}, "__author__": "x"}))
    assert torch.equal(load_detectron2_weights(ok)["backbone.w"], torch.arange(4, dtype=torch.float32))
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(pickle.UnpicklingError):
        load_detectron2_weights(bad)


def test_sam_weights_missing_offline_is_named(cache):
    from expert_wrappers.sam import build_default_sam

    with pytest.raises(MissingWeightsError, match="sam_vit_b_01ec64.pth"):
        build_default_sam("vit_b")


# ----------------------------------------------------------------------------------------------
# NLL-AngMF: the official checkpoint layout, loaded strictly


def official_decoder_keys(variant: str) -> set[str]:
    """The decoder's parameter names in scannet.pt / nyu.pt (DESIGN.md §3), written out."""
    keys = {f"decoder.{m}.{p}" for m in ("conv2", "out_conv_res8") for p in ("weight", "bias")}
    norm = ("weight", "bias") + (("running_mean", "running_var", "num_batches_tracked") if variant == "BN" else ())
    for u in range(1, 5):
        keys |= {f"decoder.up{u}._net.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")}
        keys |= {f"decoder.up{u}._net.{i}.{p}" for i in (1, 4) for p in norm}
    keys |= {f"decoder.out_conv_res{r}.{i}.{p}" for r in (4, 2, 1) for i in (0, 2, 4, 6) for p in ("weight", "bias")}
    return keys


PUBLISHED_SHAPES = {
    "decoder.conv2.weight": (2048, 2048, 1, 1),
    "decoder.up1._net.0.weight": (1024, 2048 + 176, 3, 3),
    "decoder.up2._net.0.weight": (512, 1024 + 64, 3, 3),
    "decoder.up3._net.0.weight": (256, 512 + 40, 3, 3),
    "decoder.up4._net.3.weight": (128, 128, 3, 3),
    "decoder.out_conv_res8.weight": (4, 512, 3, 3),
    "decoder.out_conv_res4.0.weight": (128, 512 + 4, 1),
    "decoder.out_conv_res2.0.weight": (128, 256 + 4, 1),
    "decoder.out_conv_res1.0.weight": (128, 128 + 4, 1),
    "decoder.out_conv_res1.6.weight": (4, 128, 1),
}


def write_official_checkpoint(path: Path, variant: str) -> dict[str, torch.Tensor]:
    """A checkpoint as the official train.py saves it — {'model': DataParallel state_dict, 'iter'}
    — with the key set built from geffnet + the published decoder, filled with random values."""
    import geffnet

    from expert_wrappers.nll_angmf import NNET

    enc = geffnet.create_model("tf_efficientnet_b5_ap", pretrained=False).state_dict()
    expected = {f"encoder.original_model.{k}" for k in enc if not k.startswith("classifier.")}
    expected |= official_decoder_keys(variant)
    shapes = {k: v.shape for k, v in NNET(variant).state_dict().items()}
    assert set(shapes) == expected
    for k, s in PUBLISHED_SHAPES.items():
        assert tuple(shapes[k]) == s, k
    g = torch.Generator().manual_seed(1)
    sd = {k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked")
              else torch.rand(s, generator=g) + 0.5 if "running_var" in k else torch.randn(s, generator=g) * 0.02)
          for k, s in shapes.items()}
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "iter": 123456}, path)
    return sd


@pytest.fixture(scope="module")
def scannet_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "scannet.pt"
    return path, write_official_checkpoint(path, "BN")


def check_loaded(expert, sd, path):
    loaded = expert.model.state_dict()
    for k in ("decoder.out_conv_res1.6.weight", "decoder.up2._net.1.weight",
              "encoder.original_model.blocks.4.0.conv_pw.weight", "encoder.original_model.bn2.weight"):
        assert torch.equal(loaded[k], sd[k]), k
    assert expert.checkpoints == {path.name: sha(path)}
    out = expert.predict([photo()])[0]  # the full b5 network end to end, at a small size
    assert out["normal"].shape == (64, 96, 3) and np.allclose(np.linalg.norm(out["normal"], axis=-1), 1, atol=1e-5)
    assert (out["normal_conf"] > 0.01).all()


def test_nll_angmf_bn_loads_the_official_layout_strictly(scannet_pt, cache):
    path, sd = scannet_pt
    check_loaded(build_expert("normal", variant="BN", weights=str(path), target_pixels=64 * 96), sd, path)


def test_nll_angmf_gn_is_found_in_the_cache_dir_and_has_no_automatic_source(cache):
    with pytest.raises(MissingWeightsError, match="Google Drive"):
        build_expert("normal", variant="GN")
    path = cache / "nll_angmf" / "nyu.pt"
    path.parent.mkdir(parents=True)
    sd = write_official_checkpoint(path, "GN")
    check_loaded(build_expert("normal", variant="GN", target_pixels=64 * 96), sd, path)


def test_nll_angmf_refuses_a_checkpoint_with_a_missing_or_foreign_key(scannet_pt, cache, tmp_path):
    from expert_wrappers.nll_angmf import official_state_dict

    sd = {f"module.{k}": v for k, v in scannet_pt[1].items()}
    sd.pop("module.decoder.out_conv_res4.2.bias")
    path = tmp_path / "scannet.pt"
    torch.save({"model": sd, "iter": 1}, path)
    with pytest.raises(RuntimeError, match="out_conv_res4.2.bias"):
        build_expert("normal", weights=str(path))
    sd["module.decoder.out_conv_res4.2.bias"] = torch.zeros(128)
    sd["module.decoder.extra.weight"] = torch.zeros(1)
    path.unlink()
    torch.save({"model": sd, "iter": 1}, path)
    with pytest.raises(RuntimeError, match="extra.weight"):
        build_expert("normal", weights=str(path))
    assert "decoder.extra.weight" in official_state_dict({"model": sd})


# ----------------------------------------------------------------------------------------------
# DPT and Mask R-CNN default loaders


def test_dpt_default_loads_a_local_model_directory(cache, tmp_path):
    from expert_wrappers.depth import build_model

    smoke, _, _ = build_model("smoke")
    d = tmp_path / "dpt-local"
    smoke.save_pretrained(d)  # config.json + model.safetensors, the hub's layout
    expert = build_expert("depth", checkpoint=str(d))
    assert expert.checkpoints == {f"dpt-local/model.safetensors": sha(d / "model.safetensors")}
    with torch.inference_mode():
        x = torch.randn(1, 3, 64, 64)
        assert torch.equal(expert.model(pixel_values=x).predicted_depth, smoke.eval()(pixel_values=x).predicted_depth)
    out = expert.predict([photo()])[0]["depth"]
    assert out.shape == (64, 96) and out.dtype == np.float32 and out.min() >= 0
    with pytest.raises(MissingWeightsError, match="incomplete or missing"):
        build_expert("depth", checkpoint=str(tmp_path / "empty-dir"))
    with pytest.raises(MissingWeightsError, match="Intel/dpt-hybrid-midas.*offline"):
        build_expert("depth", checkpoint="Intel/dpt-hybrid-midas")


def test_torchvision_maskrcnn_default_is_found_in_the_cache_and_loads_strictly(cache):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    from expert_wrappers.seg import torchvision_url

    filename = torchvision_url().rsplit("/", 1)[1]
    path = cache / "torchvision" / filename
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    sd = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    torch.save(sd, path)
    expert = build_expert("seg", min_size=128, max_size=192)
    assert expert.checkpoints == {filename: sha(path)}
    assert torch.equal(expert.model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       sd["roi_heads.box_predictor.cls_score.weight"])
    assert expert.describe()["backend"] == "torchvision"
    out = expert.predict([photo()])[0]["seg"]
    assert out.shape == (64, 96) and out.dtype == np.uint8
