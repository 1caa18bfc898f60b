"""Label codes: the host (numpy) and device (torch) conversions agree bit for bit, ``pack`` of codes
is ``encode`` of the map, and the null experts' closed-form constant codes are what the encoder
gives their constant maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import labels, labels_torch

SHAPES = [(1, 1), (1, 7), (5, 1), (37, 53), (190, 256)]


def maps(h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every kind, with hard cases: normals on the fold (z = 0), axes and both hemispheres."""
    rng = np.random.default_rng(seed)
    n = rng.normal(size=(h, w, 3)).astype(np.float32)
    n.reshape(-1, 3)[: min(6, h * w)] = [[0, 0, 1], [0, 0, -1], [1, 0, 0], [0, -1, 0], [0.6, 0.8, 0],
                                         [-0.6, 0, -0.8]][: min(6, h * w)]
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    depth = (rng.random((h, w), dtype=np.float32) * 7).cumsum(axis=0, dtype=np.float32)
    return {"seg": rng.integers(0, 81, (h, w)).astype(np.uint8), "seg_conf": rng.random((h, w), dtype=np.float32),
            "depth": depth, "normal": n, "normal_conf": 1.01 + rng.random((h, w), dtype=np.float32) * 50}


@pytest.mark.parametrize("hw", SHAPES)
def test_device_codes_equal_host_codes_bit_for_bit(hw):
    for kind, arr in maps(*hw).items():
        host = labels.to_codes(kind, arr)
        dev = labels_torch.to_codes(kind, torch.from_numpy(arr))
        assert dev.codes.dtype == host.codes.dtype and dev.shape == host.shape == hw
        assert (dev.lo, dev.hi) == (host.lo, host.hi), kind
        np.testing.assert_array_equal(dev.codes, host.codes, err_msg=kind)
        assert labels.pack(dev, image_size=(2 * hw[0], 2 * hw[1])) == \
            labels.encode(kind, arr, image_size=(2 * hw[0], 2 * hw[1]))


@pytest.mark.parametrize("hw", [(1, 1), (5, 1), (37, 53)])
def test_batched_device_codes_equal_host_codes_per_image(hw):
    """A whole batch per kind (one range reduction, one host copy) gives each image the codes the
    host gives it alone — including a constant image (zero span) next to varying ones."""
    per_image = [maps(*hw, seed=s) for s in range(4)]
    per_image[2]["depth"][:] = 3.5
    per_image[1]["seg_conf"][:] = 0.0
    batches = [(kind, torch.from_numpy(np.stack([m[kind] for m in per_image]))) for kind in per_image[0]]
    got = labels_torch.to_codes_many(batches)
    assert len(got) == len(batches)
    for (kind, _), codes in zip(batches, got):
        assert len(codes) == len(per_image)
        for m, dev in zip(per_image, codes):
            host = labels.to_codes(kind, m[kind])
            assert (dev.lo, dev.hi) == (host.lo, host.hi), kind
            np.testing.assert_array_equal(dev.codes, host.codes, err_msg=kind)
            np.testing.assert_array_equal(dev.class_pixels() if kind == "seg" else 0,
                                          host.class_pixels() if kind == "seg" else 0)
            assert labels.pack(dev, image_size=(9, 9)) == labels.pack(host, image_size=(9, 9))


def test_batched_device_codes_name_the_bad_image():
    good = maps(6, 7)
    depth = np.stack([good["depth"], good["depth"]])
    depth[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="image 1 of the batch"):
        labels_torch.to_codes_many([("depth", torch.from_numpy(depth))])
    normal = np.stack([good["normal"]] * 3)
    normal[2, 0, 0, 1] = np.nan
    with pytest.raises(ValueError, match="image 2 of the batch"):
        labels_torch.to_codes_many([("normal", torch.from_numpy(normal))])


def test_to_host_returns_every_dtype_the_codes_use():
    ts = [torch.arange(6, dtype=torch.int16).view(2, 3), torch.tensor([True, False]),
          torch.tensor([1.5, -2.0]), torch.arange(4, dtype=torch.int64), torch.arange(3, dtype=torch.uint8)]
    for t, a in zip(ts, labels_torch.to_host(ts)):
        np.testing.assert_array_equal(a, t.numpy())
        assert a.dtype == t.numpy().dtype and a.shape == tuple(t.shape)


def test_device_seg_codes_carry_their_histogram():
    seg = maps(37, 53)["seg"]
    c = labels_torch.to_codes("seg", torch.from_numpy(seg))
    assert c.histogram is not None
    np.testing.assert_array_equal(c.class_pixels(), np.bincount(seg.ravel(), minlength=256))
    np.testing.assert_array_equal(labels.to_codes("seg", seg).class_pixels(), c.class_pixels())


def test_device_codes_refuse_what_the_host_refuses():
    bad = np.ones((4, 5), np.float32)
    bad[1, 2] = np.nan
    for kind in ("depth", "normal_conf"):
        with pytest.raises(ValueError, match="NaN"):
            labels_torch.to_codes(kind, torch.from_numpy(bad))
        with pytest.raises(ValueError, match="NaN"):
            labels.to_codes(kind, bad)
    normal = np.zeros((4, 5, 3), np.float32)
    normal[..., 2] = -1
    normal[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        labels_torch.to_codes("normal", torch.from_numpy(normal))
    with pytest.raises(ValueError, match="shape"):
        labels_torch.to_codes("normal", torch.zeros(4, 5))
    with pytest.raises(ValueError, match="uint8"):
        labels_torch.to_codes("seg", torch.zeros(4, 5))
    with pytest.raises(ValueError, match="unknown"):
        labels_torch.to_codes("albedo", torch.zeros(4, 5))


def test_codes_are_validated():
    with pytest.raises(ValueError, match="uint16"):
        labels.Codes("depth", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        labels.Codes("seg", np.zeros((3, 3), np.uint16))
    with pytest.raises(ValueError, match="histogram"):
        labels.Codes("depth", np.zeros((3, 3), np.uint16), histogram=np.zeros(256))
    with pytest.raises(ValueError, match="unknown"):
        labels.Codes("albedo", np.zeros((3, 3), np.uint8))


@pytest.mark.parametrize("hw", [(1, 1), (3, 8), (150, 226)])
def test_null_constant_codes_equal_the_encoded_constant_maps(hw):
    from expert_wrappers.null import NULL_VALUES, constant_codes, constant_map

    for kind in NULL_VALUES:
        fast = constant_codes(kind, hw)
        full = labels.to_codes(kind, np.array(constant_map(kind, hw)))
        np.testing.assert_array_equal(fast.codes, full.codes)
        assert (fast.lo, fast.hi) == (full.lo, full.hi)
        assert labels.pack(fast) == labels.pack(full)
        if kind == "seg":
            np.testing.assert_array_equal(fast.class_pixels(), full.class_pixels())


def test_null_experts_give_codes_or_maps_at_the_asked_size():
    from expert_wrappers import build_expert

    img = np.zeros((30, 41, 3), np.uint8)
    sizes = [(15, 20), (7, 9)]
    as_codes = build_expert("normal", "null", device_codes=True).predict([img, img], sizes)
    as_maps = build_expert("normal", "null", device_codes=False).predict([img, img], sizes)
    for codes, floats, hw in zip(as_codes, as_maps, sizes):
        assert set(codes) == set(floats) == {"normal", "normal_conf"}
        for kind in codes:
            assert isinstance(codes[kind], labels.Codes) and codes[kind].shape == hw
            assert floats[kind].shape[:2] == hw and floats[kind].dtype == np.float32
            assert labels.pack(codes[kind]) == labels.encode(kind, floats[kind])
    with pytest.raises(ValueError, match="sizes"):
        build_expert("depth", "null").predict([img], sizes=[(1, 2), (3, 4)])
