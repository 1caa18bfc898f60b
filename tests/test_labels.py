"""Label format v1: round trips, error bounds, refusal of bad members, and a reader that uses
only numpy + zstandard (what docs/LABELS.md promises third parties)."""
import json
import struct

import numpy as np
import pytest
import zstandard

from pipeline import labels
from pipeline.labels import LabelFormatError, decode, encode, member_name


def sphere(n, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def angle_deg(a, b):
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


def test_seg_round_trip_exact():
    seg = np.random.default_rng(0).integers(0, 81, (37, 53)).astype(np.uint8)
    seg[:3] = labels.SEG_IGNORE
    assert (decode("000010002.seg.lbl", encode("seg", seg)) == seg).all()


def test_depth_quantisation_error_bound():
    import skimage.data

    disp = skimage.data.stereo_motorcycle()[2].astype(np.float32)
    disp = np.nan_to_num(disp, nan=0.0, posinf=0.0, neginf=0.0)  # occlusions are marked inf
    back = decode("k.depth.lbl", encode("depth", disp))
    assert back.dtype == np.float32 and back.shape == disp.shape
    span = disp.max() - disp.min()
    assert np.abs(back - disp).max() <= span * 1e-4
    # values keep their scale: relative inverse depth comes back, not a normalised map
    assert back.max() == pytest.approx(disp.max(), rel=1e-5)


def test_constant_map():
    d = np.full((5, 7), 3.25, np.float32)
    assert (decode("k.depth.lbl", encode("depth", d)) == 3.25).all()


def test_normals_angular_error_below_one_degree():
    n = sphere(100_000).reshape(250, 400, 3)
    back = decode("k.normal.lbl", encode("normal", n))
    assert back.shape == n.shape and back.dtype == np.float32
    assert np.allclose(np.linalg.norm(back, axis=-1), 1, atol=1e-5)
    assert angle_deg(back, n).max() < 1.0
    # poles and octahedron edges are where naive encoders fail
    special = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0],
                        [1, 1, 0], [-1, 0, -1]], np.float64)
    special /= np.linalg.norm(special, axis=1, keepdims=True)
    back = decode("k.normal.lbl", encode("normal", special[None]))
    assert angle_deg(back[0], special).max() < 1.0


def test_confidence_maps_and_member_names():
    kappa = np.random.default_rng(1).uniform(1.01, 300, (20, 30)).astype(np.float32)
    out = labels.encode_sample("000000007", {"normal": np.dstack([np.zeros((20, 30, 2)), -np.ones((20, 30))]),
                                             "normal_conf": kappa, "depth": kappa}, (40, 60))
    assert sorted(out) == ["depth", "normal"]
    assert sorted(out["normal"]) == ["000000007.normal.lbl", "000000007.normal_conf.lbl"]
    header, back = labels.decode_with_header(out["normal"]["000000007.normal_conf.lbl"])
    assert header["image_size"] == [40, 60] and header["shape"] == [20, 30]
    assert np.abs(back - kappa).max() <= (kappa.max() - kappa.min()) / 65535


def test_rejects_nonfinite_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        encode("depth", np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode("normal", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="uint8"):
        encode("seg", np.zeros((4, 4), np.int64))


def test_unknown_version_is_refused():
    data = bytearray(encode("seg", np.zeros((4, 4), np.uint8)))
    data[4:6] = struct.pack("<H", 3)
    with pytest.raises(LabelFormatError, match="version 3 is not supported"):
        decode("k.seg.lbl", bytes(data))


def _as_version_1(data: bytes) -> bytes:
    """The same member as format 1 wrote it: version 1, no "orientation" in the header."""
    _, _, n = struct.unpack_from("<4sHH", data)
    header = json.loads(data[8:8 + n])
    del header["orientation"]
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<4sHH", b"CTXL", 1, len(h)) + h + data[8 + n:]


def test_version_1_members_still_decode():
    rng = np.random.default_rng(8)
    for kind in ("seg", "depth", "normal", "normal_conf"):
        data = encode(kind, _random_map(kind, 9, 13, rng), image_size=(18, 26), orientation=6)
        old = _as_version_1(data)
        assert struct.unpack_from("<H", old, 4)[0] == 1
        header, arr = labels.decode_with_header(old)
        assert "orientation" not in header and header["image_size"] == [18, 26]
        assert np.array_equal(arr, decode(member_name("k", kind), data), equal_nan=False), kind


def test_orientation_is_recorded_and_checked():
    data = encode("seg", np.zeros((2, 3), np.uint8), image_size=(4, 6), orientation=8)
    assert labels.decode_with_header(data)[0]["orientation"] == 8
    with pytest.raises(ValueError, match="orientation"):
        encode("seg", np.zeros((2, 3), np.uint8), orientation=9)


def test_label_size_rounds_half_up():
    """Format 2's rule, max(1, floor(n * scale + 0.5)): the cases where format 1's round-half-to-even
    went down (741 * 0.5 = 370.5 -> 370) now go up, like every other half."""
    assert labels.label_shape((451, 741), 0.5) == (226, 371)
    assert labels.label_shape((3, 5), 0.5) == (2, 3)
    assert labels.label_shape((1, 1), 0.5) == (1, 1) and labels.label_shape((1, 2), 0.25) == (1, 1)
    assert labels.label_shape((100, 7), 1.0) == (100, 7)
    with pytest.raises(ValueError):
        labels.label_shape((10, 10), 0)


def _forge(header: dict, raw: bytes, content_size=True) -> bytes:
    h = json.dumps(header).encode()
    frame = zstandard.ZstdCompressor(write_content_size=content_size).compress(raw)
    return struct.pack("<4sHH", b"CTXL", 1, len(h)) + h + frame


def test_bomb_is_refused_before_allocation():
    # 1 GiB of zeros compresses to ~40 KB; the header claims a 4x4 map
    cctx = zstandard.ZstdCompressor()
    bomb = cctx.compress(b"\0" * (1 << 30))
    h = json.dumps({"kind": "seg", "codec": "u8", "shape": [4, 4]}).encode()
    data = struct.pack("<4sHH", b"CTXL", 1, len(h)) + h + bomb
    with pytest.raises(LabelFormatError, match="allows exactly 16"):
        decode("k.seg.lbl", data)
    # a frame that hides its size is refused too (it could be anything)
    with pytest.raises(LabelFormatError):
        decode("k.seg.lbl", _forge({"kind": "seg", "codec": "u8", "shape": [4, 4]}, b"\0" * 16, False))
    # and a header cannot claim an absurd shape
    with pytest.raises(LabelFormatError, match="outside"):
        decode("k.seg.lbl", _forge({"kind": "seg", "codec": "u8", "shape": [1 << 20, 1 << 20]}, b""))


def test_garbage_and_mismatched_members():
    with pytest.raises(LabelFormatError):
        decode("k.seg.lbl", b"\x89PNG\r\n\x1a\n")
    with pytest.raises(LabelFormatError, match="holds a 'seg'"):
        decode("k.depth.lbl", encode("seg", np.zeros((2, 2), np.uint8)))
    with pytest.raises(LabelFormatError):
        labels.split_member_name("k.seg.png")


def test_resize_to_label_resolution():
    seg = np.zeros((100, 200), np.uint8)
    seg[:, 100:] = 7
    h, w = labels.label_shape((100, 200), 0.5)
    small = labels.resize_map("seg", seg, (h, w))
    assert small.shape == (50, 100) and set(np.unique(small)) == {0, 7}
    n = np.zeros((100, 200, 3), np.float32)
    n[..., 2] = -1
    n[:, :, 0] = 0.3
    ns = labels.resize_map("normal", n, (h, w))
    assert ns.shape == (50, 100, 3) and np.allclose(np.linalg.norm(ns, axis=-1), 1, atol=1e-5)



def _box_reference(arr, hw):
    """Explicit loops with exact fractions: label pixel (i, j) is the mean of the image pixels whose
    centres lie in its footprint (i s, (i + 1) s] x (j t, (j + 1) t], s = H / h, t = W / w."""
    from fractions import Fraction

    H, W = arr.shape[:2]
    h, w = hw

    def members(n_in, n_out, i):
        s = Fraction(n_in, n_out)
        return [y for y in range(n_in) if i * s < y + Fraction(1, 2) <= (i + 1) * s]

    out = np.zeros((h, w) + arr.shape[2:])
    for i in range(h):
        rows = members(H, h, i)
        for j in range(w):
            cols = members(W, w, j)
            out[i, j] = arr[np.ix_(rows, cols)].astype(np.float64).mean((0, 1))
    return out


# (image size, label size): label_scale 1/2 of odd and even sizes, a 3x shrink, uneven factors with
# centres exactly on a footprint edge (15 -> 8: pixel 7's centre is on the edge of outputs 3 and 4)
SHRINKS = [((40, 60), (20, 30)), ((37, 23), (19, 12)), ((15, 33), (8, 11)), ((30, 21), (10, 7)), ((11, 13), (6, 5))]


@pytest.mark.parametrize("size,hw", SHRINKS)
def test_shrinking_a_continuous_map_is_a_box_average_on_host_and_device(size, hw):
    import torch

    from expert_wrappers._torch import resize_on_device

    rng = np.random.default_rng(size[0] * 100 + size[1])
    depth = (rng.random(size) * 50).astype(np.float32)  # noise: a nearest or shifted resize shows everywhere
    want = _box_reference(depth, hw)
    host = labels.resize_map("depth", depth, hw)
    device = resize_on_device("seg_conf", torch.from_numpy(depth), hw).numpy()
    for got in (host, device):
        assert got.dtype == np.float32 and got.shape == hw
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if size[0] % hw[0] == 0 and size[1] % hw[1] == 0:  # integer factors: plain block means
        blocks = depth.reshape(hw[0], size[0] // hw[0], hw[1], size[1] // hw[1]).mean((1, 3))
        np.testing.assert_allclose(host, blocks, rtol=1e-6)
    # normals: the box average of each component, then renormalised
    v = rng.normal(size=size + (3,)).astype(np.float32)
    normal = v / np.linalg.norm(v, axis=-1, keepdims=True)
    mean = _box_reference(normal, hw)
    np.testing.assert_allclose(labels.resize_map("normal", normal, hw),
                               mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size,hw", SHRINKS + [((375, 500), (188, 250)), ((333, 500), (167, 250))])
def test_class_ids_take_the_pixel_at_each_label_pixels_centre(size, hw):
    """Nearest at pixel centres: label pixel i takes image pixel floor((i + 1/2) H / h), on host and
    device; the first and last rows/columns included."""
    import torch

    from expert_wrappers._torch import resize_on_device

    seg = np.random.default_rng(1).integers(0, 81, size).astype(np.uint8)
    rows = [(2 * i + 1) * size[0] // (2 * hw[0]) for i in range(hw[0])]
    cols = [(2 * j + 1) * size[1] // (2 * hw[1]) for j in range(hw[1])]
    want = seg[np.ix_(rows, cols)]
    assert np.array_equal(labels.resize_map("seg", seg, hw), want)
    assert np.array_equal(resize_on_device("seg", torch.from_numpy(seg), hw).numpy(), want)

def spec_decoder():
    """The decoder printed in docs/LABELS.md, executed as written: it imports nothing of ours."""
    import re

    from tests.conftest import REPO

    doc = (REPO / "docs" / "LABELS.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "def decode_label" in b]
    assert len(blocks) == 1
    assert "pipeline" not in blocks[0] and "cliptex" not in blocks[0]
    namespace: dict = {}
    exec(blocks[0], namespace)
    return namespace["decode_label"]


def test_spec_recipe_decodes_bit_for_bit():
    """docs/LABELS.md's recipe and our reader give the same bits for every kind, on random maps (every
    delta wraps somewhere, every octahedral code region is hit), on constant maps (lo == hi), on
    every octahedral code and on a version 1 member."""
    decode_label = spec_decoder()
    rng = np.random.default_rng(3)
    cases = []
    for kind in labels.KINDS:
        for H, W in [(1, 1), (16, 24), (129, 77)]:
            cases.append((kind, _random_map(kind, H, W, rng)))
        cases.append((kind, _constant_map(kind, (5, 7))))
    cases.append(("normal", labels.octahedral_table().reshape(256, 256, 3)))  # every code once
    for kind, arr in cases:
        data = encode(kind, arr, image_size=(2 * arr.shape[0], 2 * arr.shape[1]))
        for member in (data, _as_version_1(data)):
            ours = decode(member_name("k", kind), member)
            theirs = decode_label(member)
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, kind
            # the same bits, not merely close values
            assert np.array_equal(theirs.view(np.uint8), ours.view(np.uint8)), (kind, arr.shape)


def _constant_map(kind, hw):
    if kind == "seg":
        return np.full(hw, 7, np.uint8)
    if kind == "normal":
        return np.broadcast_to(np.array([0.6, 0.0, -0.8], np.float32), tuple(hw) + (3,)).copy()
    return np.full(hw, 2.5, np.float32)


def _reference_codes(data):
    """Stored codes the slow, obvious way (numpy + zstandard, cumsum over rows): what the fast
    decoder must reproduce bit for bit."""
    h, payload = labels.read_header(data)
    raw = zstandard.ZstdDecompressor().decompress(payload)
    H, W = h["shape"]
    if h["codec"] == "u8":
        return np.frombuffer(raw, np.uint8).reshape(H, W)
    b = np.frombuffer(raw, np.uint8).reshape(2, -1).astype(np.uint16)
    codes = (b[0] | (b[1] << 8)).reshape(H, W)
    return codes if h["codec"] == "u16q" else np.cumsum(codes, axis=0, dtype=np.uint16)


def _random_map(kind, H, W, rng):
    if kind == "seg":
        return rng.integers(0, 256, (H, W)).astype(np.uint8)
    if kind == "normal":
        return sphere(H * W, int(rng.integers(1 << 30))).reshape(H, W, 3)
    return rng.random((H, W)).astype(np.float32) * 10  # noise: every delta wraps somewhere


SHAPES = [(1, 1), (1, 9), (2, 3), (3, 5), (7, 1), (16, 24), (129, 77), (300, 41), (5, 400), (256, 256)]
KINDS_BY_CODEC = ["seg", "seg_conf", "depth", "normal"]  # u8, u16q, u16q_delta, oct16_delta


def test_codes_equal_the_reference_decoder():
    rng = np.random.default_rng(5)
    for H, W in SHAPES:  # heights that are and are not powers of two (the row scan doubles its step)
        for kind in KINDS_BY_CODEC:
            data = encode(kind, _random_map(kind, H, W, rng))
            codes, ref = labels.decode_codes(data)[1], _reference_codes(data)
            assert codes.shape == (H, W) and codes.dtype == ref.dtype and (codes == ref).all(), (kind, H, W)


def test_window_decode_equals_full_decode_cropped():
    rng = np.random.default_rng(6)
    for H, W in SHAPES:
        for kind in KINDS_BY_CODEC:
            data = encode(kind, _random_map(kind, H, W, rng))
            header, full = labels.decode_codes(data)
            windows = [(0, H, 0, W), (0, 1, 0, W), (H - 1, H, 0, W), (0, H, W - 1, W), (H // 2, H // 2, 0, W)]
            for _ in range(25):
                r0, r1 = sorted(int(v) for v in rng.integers(0, H + 1, 2))
                c0, c1 = sorted(int(v) for v in rng.integers(0, W + 1, 2))
                windows.append((r0, r1, c0, c1))
            for r0, r1, c0, c1 in windows:
                _, payload = labels.read_header(data)
                got = labels.decode_payload(header, payload, slice(r0, r1), slice(c0, c1))
                want = full[r0:r1, c0:c1]
                assert got.dtype == want.dtype and got.shape == want.shape, (kind, H, W, r0, r1, c0, c1)
                assert (got == want).all(), (kind, H, W, r0, r1, c0, c1)
                got[...] = 0  # the caller owns it: no read-only view of the member's bytes
    with pytest.raises(ValueError, match="step 1"):
        labels.decode_payload(header, payload, slice(0, H, 2), slice(None))


def test_window_decode_checks_the_whole_frame():
    data = encode("depth", np.random.default_rng(7).random((32, 32)).astype(np.float32))
    header, payload = labels.read_header(data)
    with pytest.raises(LabelFormatError):  # the frame ends early, far below the window
        labels.decode_payload(header, payload[:-9], slice(0, 2), slice(0, 2))
    broken = zstandard.ZstdCompressor().compress(bytes(2 * 33 * 32))  # one row too many
    with pytest.raises(LabelFormatError, match="allows exactly"):
        labels.decode_payload(header, broken, slice(0, 2), slice(0, 2))
    # the decoder reused by this thread is still good after a failure
    assert (labels.decode_payload(header, payload) == _reference_codes(data)).all()
