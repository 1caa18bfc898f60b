"""The img2dataset reader on real damaged files: every bad-input class gets a recorded reason."""
import io
import json
import tarfile
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.shards import Sample, Skip, decode_image, iter_samples, tar_bytes
from pipeline.storage import sha256, write_tar_atomic


def jpeg(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def raw_tar(path, members):
    """Like tar_bytes but without its safety check, to build hostile archives. A member is
    (name, bytes) or a ready TarInfo (links, devices); ``path`` may be a file object."""
    where = {"fileobj": path} if hasattr(path, "write") else {"name": path}
    with tarfile.open(mode="w", format=tarfile.GNU_FORMAT, **where) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            ti = tarfile.TarInfo(m[0])
            ti.size = len(m[1])
            tar.addfile(ti, io.BytesIO(m[1]))
    return path


def sample_members(key, image_bytes, caption=b"a photo"):
    return [(f"{key}.jpg", image_bytes), (f"{key}.txt", caption), (f"{key}.json", b"{}")]


def read_all(path, **kw):
    items = list(iter_samples(path, **kw))
    samples = {i.key: i for i in items if isinstance(i, Sample)}
    skips = [i for i in items if isinstance(i, Skip)]
    return samples, skips


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()[::2, ::2].copy()


def test_good_shard_reads_in_order(sample_dir):
    samples, skips = read_all(sample_dir / "00000.tar")
    assert skips == []
    assert list(samples) == [f"00000{i:04d}" for i in range(8)]
    for s in samples.values():
        assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
        assert s.caption and s.meta["key"] == s.key


@pytest.mark.parametrize("bad,reason", [
    (b"", "empty_image"),
    (b"<html><body>404 not found</body></html>", "not_an_image"),
])
def test_unusable_image_bytes(tmp_path, astronaut, bad, reason):
    path = raw_tar(tmp_path / "s.tar", sample_members("a", jpeg(astronaut)) + sample_members("b", bad))
    samples, skips = read_all(path)
    assert list(samples) == ["a"]
    assert [(s.key, s.reason) for s in skips] == [("b", reason)]


def test_truncated_jpeg(tmp_path, astronaut):
    data = jpeg(astronaut)
    path = raw_tar(tmp_path / "s.tar", sample_members("t", data[: len(data) // 2]))
    samples, skips = read_all(path)
    assert samples == {} and [(s.key, s.reason) for s in skips] == [("t", "truncated_image")]


def test_colour_modes_convert_to_rgb(tmp_path, astronaut):
    grey = skimage.data.camera()
    logo = Image.fromarray(skimage.data.logo())  # RGBA with transparent background
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    members = (sample_members("cmyk", _cmyk_jpeg(astronaut))
               + sample_members("grey", jpeg(grey))
               + sample_members("p", png(Image.fromarray(astronaut).convert("P")))
               + sample_members("rgba", png(logo))
               + sample_members("i16", png(sixteen)))
    samples, skips = read_all(raw_tar(tmp_path / "s.tar", members))
    assert skips == []
    modes = {k: s.source_mode for k, s in samples.items()}
    assert modes == {"cmyk": "CMYK", "grey": "L", "p": "P", "rgba": "RGBA", "i16": "I;16"}
    for s in samples.values():
        assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
    # values survive the conversions (not just shapes)
    assert np.abs(samples["cmyk"].image.astype(int) - astronaut).mean() < 12
    assert np.abs(samples["grey"].image[..., 0].astype(int) - grey).mean() < 3
    assert np.abs(samples["i16"].image[..., 1].astype(int) - grey).max() <= 1
    alpha = skimage.data.logo()[..., 3]
    assert (samples["rgba"].image[alpha == 0] == 255).all()  # transparent -> white


def _cmyk_jpeg(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_exif_orientation_applied(tmp_path, astronaut):
    img = Image.fromarray(astronaut[:, :200])  # 256 x 200: not square, so rotation shows
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW for display
    path = raw_tar(tmp_path / "s.tar", sample_members("e", jpeg(np.asarray(img), exif=exif.tobytes())))
    samples, _ = read_all(path)
    assert samples["e"].image.shape == (200, 256, 3)
    expected = np.rot90(astronaut[:, :200], k=-1)
    assert np.abs(samples["e"].image.astype(int) - expected).mean() < 12


def test_decompression_bomb_refused_before_decoding(tmp_path):
    data = bytearray(png(Image.new("L", (64, 64))))
    # IHDR width/height at bytes 16..24: claim 100000 x 100000 pixels, with a valid chunk CRC
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path = raw_tar(tmp_path / "s.tar", sample_members("bomb", bytes(data)))
    _, skips = read_all(path)
    assert [(s.key, s.reason) for s in skips] == [("bomb", "decompression_bomb")]
    with pytest.raises(ValueError, match="decompression_bomb"):
        decode_image(png(Image.new("L", (300, 300))), max_pixels=300 * 299)


def test_caption_problems(tmp_path, astronaut):
    img = jpeg(astronaut)
    members = ([("nocap.jpg", img)] + sample_members("badutf", img, b"caf\xe9 \xff")
               + sample_members("blank", img, b"  \n") + [("noimg.txt", b"caption only")])
    _, skips = read_all(raw_tar(tmp_path / "s.tar", members))
    assert [(s.key, s.reason) for s in skips] == [
        ("nocap", "missing_caption"), ("badutf", "invalid_caption"), ("blank", "invalid_caption"),
        ("noimg", "missing_image")]


def test_duplicate_key(tmp_path, astronaut):
    img = jpeg(astronaut)
    members = sample_members("a", img) + sample_members("b", img) + sample_members("a", img)
    samples, skips = read_all(raw_tar(tmp_path / "s.tar", members))
    assert list(samples) == ["a", "b"]
    assert {(s.key, s.reason) for s in skips} == {("a", "duplicate_key")}


def test_unsafe_member_names_never_touch_the_filesystem(tmp_path, astronaut):
    img = jpeg(astronaut)
    work = tmp_path / "deep" / "dir"
    work.mkdir(parents=True)
    members = [("../evil.jpg", img), ("../evil.txt", b"x"), ("/abs/evil.jpg", img)] + sample_members("ok", img)
    samples, skips = read_all(raw_tar(work / "s.tar", members))
    assert list(samples) == ["ok"]
    # counted per sample: "../evil" (2 members) and "/abs/evil"
    assert [(s.key, s.reason) for s in skips] == [("../evil", "unsafe_member_name"), ("/abs/evil", "unsafe_member_name")]
    assert not (tmp_path / "deep" / "evil.jpg").exists() and not (tmp_path / "abs").exists()
    with pytest.raises(ValueError, match="unsafe"):
        tar_bytes([("../x.jpg", b"")])


def test_truncated_tar_keeps_samples_before_damage(tmp_path, sample_dir):
    data = (sample_dir / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    samples, skips = read_all(cut)
    full, _ = read_all(sample_dir / "00000.tar")
    assert 2 <= len(samples) < len(full)
    assert list(samples) == list(full)[: len(samples)]  # the prefix, in order
    assert skips[-1].reason == "truncated_tar" and skips[-1].key is None


def test_empty_tars(tmp_path):
    (tmp_path / "zero.tar").write_bytes(b"")
    raw_tar(tmp_path / "nomembers.tar", [])
    for name in ("zero.tar", "nomembers.tar"):
        samples, skips = read_all(tmp_path / name)
        assert samples == {} and [s.reason for s in skips] == ["empty_tar"], name


def test_writer_is_atomic_and_deterministic(tmp_path):
    members = [("k.txt", b"hello"), ("k.json", json.dumps({"a": 1}).encode())]
    sha1, size1 = write_tar_atomic(tmp_path / "a.tar", members)
    sha2, _ = write_tar_atomic(tmp_path / "b.tar", members)
    assert sha1 == sha2 == sha256(tmp_path / "a.tar") and size1 % 512 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # no temp left behind

    def broken():
        yield "k.txt", b"x"
        raise RuntimeError("worker died mid-shard")

    with pytest.raises(RuntimeError):
        write_tar_atomic(tmp_path / "c.tar", broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]
