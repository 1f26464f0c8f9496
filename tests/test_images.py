"""load_image / load_images: every conversion rule, every failure as ImageError."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from perceptual_engine import load_image, load_images
from perceptual_engine.errors import ConfigError, ImageError, PerceptualError
from perceptual_engine.images import center_crop, match_sizes, resize


def _rgb(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_exact(tmp_path):
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (1, 3, 24, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[0].transpose(1, 2, 0), arr.astype(np.float32) / 255)


def test_grayscale_replicated(tmp_path):
    g = _rgb()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png")[0]
    assert x.shape == (3, 24, 32)
    for c in range(3):
        np.testing.assert_array_equal(x[c], g / np.float32(255))


def test_16bit_grayscale_scaled_by_65535(tmp_path):
    g = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = load_image(tmp_path / "g16.png")[0]
    np.testing.assert_allclose(x[1], g / 65535.0, atol=1e-7)
    assert x.max() > 0.9  # not divided by 255 and clipped


def test_32bit_int_image_treated_as_16bit_and_out_of_range_refused(tmp_path):
    g = np.full((16, 16), 30000, np.int32)
    Image.fromarray(g, "I").save(tmp_path / "i.tif")
    np.testing.assert_allclose(load_image(tmp_path / "i.tif"), 30000 / 65535, atol=1e-7)
    Image.fromarray(np.full((16, 16), 70000, np.int32), "I").save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match="0..65535"):
        load_image(tmp_path / "big.tif")


def test_float_image(tmp_path):
    f = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    np.testing.assert_allclose(load_image(tmp_path / "f.tif")[0, 2], f, atol=1e-7)
    Image.fromarray(f * 255, "F").save(tmp_path / "f255.tif")
    with pytest.raises(ImageError, match=r"outside \[0, 1\]"):
        load_image(tmp_path / "f255.tif")


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:4, :, 3] = 0  # top half transparent
    arr[4:, :, 3] = 255  # bottom opaque
    arr[4:, :4, 3] = 51  # 20 % opaque red
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")[0]
    np.testing.assert_allclose(x[:, :4], 1.0)  # transparent -> white
    np.testing.assert_allclose(x[:, 4:, 4:, ].reshape(3, -1).T, [[1, 0, 0]] * 16)
    np.testing.assert_allclose(x[:, 4, 0], [1.0, 0.8, 0.8], atol=1e-6)


def test_la_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 2), np.uint8)
    arr[..., 1] = 0
    Image.fromarray(arr, "LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(load_image(tmp_path / "la.png"), 1.0)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    x = load_image(tmp_path / "p.png")[0]
    np.testing.assert_allclose(x[:, 0, 0], [0, 1, 0])  # opaque green
    np.testing.assert_allclose(x[:, 5, 5], [1, 1, 1])  # transparent blue -> white


def test_cmyk_jpeg_converted_by_pillow(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    im = Image.open(tmp_path / "c.jpg")
    assert im.mode == "CMYK"
    expected = np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    x = load_image(tmp_path / "c.jpg")[0]
    np.testing.assert_allclose(x, expected)
    assert x[0].mean() > 0.9 and x[1].mean() < 0.1  # red


def test_exif_orientation_applied(tmp_path):
    # Stored 20 high x 40 wide, left half red, right half blue; orientation 6 means
    # "rotate 90 degrees clockwise to display": upright it is 40 high x 20 wide, red on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "r.jpg")
    assert x.shape == (1, 3, 40, 20)
    assert x[0, 0, :15].mean() > 0.9 and x[0, 2, :15].mean() < 0.1  # top: red
    assert x[0, 2, 25:].mean() > 0.9 and x[0, 0, 25:].mean() < 0.1  # bottom: blue


def test_first_frame_of_gif(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    x = load_image(tmp_path / "a.gif")[0]
    assert x[0].mean() > 0.9 and x[2].mean() < 0.1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "x.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    assert issubclass(ImageError, PerceptualError)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + \
        chunk(b"IEND", b"")


def test_pixel_budget_checked_before_decoding(tmp_path):
    # 81 M pixels claimed in 70 bytes: over our budget, under Pillow's own limits.
    (tmp_path / "big.png").write_bytes(_png_header_only(9000, 9000))
    with pytest.raises(ImageError, match="81000000 pixels, over the budget"):
        load_image(tmp_path / "big.png")
    # 10^10 pixels: Pillow refuses it at open, whatever our budget.
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    for budget in (None, 10**12):
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(tmp_path / "bomb.png", max_pixels=budget)
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match="400 pixels, over the budget of 100"):
        load_image(tmp_path / "small.png", max_pixels=100)


def test_load_images_batch_and_size_mismatch(tmp_path):
    for i in range(3):
        Image.fromarray(_rgb(seed=i)).save(tmp_path / f"{i}.png")
    batch = load_images([tmp_path / f"{i}.png" for i in range(3)])
    assert batch.shape == (3, 3, 24, 32) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1:2], load_image(tmp_path / "1.png"))
    Image.fromarray(_rgb(10, 12)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match=r"small.png is 10x12"):
        load_images([tmp_path / "0.png", tmp_path / "small.png"])
    with pytest.raises(ImageError, match="no paths"):
        load_images([])


def test_size_policies():
    rng = np.random.default_rng(0)
    x = rng.random((3, 20, 30), dtype=np.float32)
    y = rng.random((3, 16, 40), dtype=np.float32)
    with pytest.raises(ImageError, match="20x30 vs 16x40"):
        match_sizes(x, y, "error")
    a, b = match_sizes(x, y, "resize")
    assert a is x and b.shape == (3, 20, 30) and 0 <= b.min() and b.max() <= 1
    a, b = match_sizes(x, y, "center-crop")
    assert a.shape == b.shape == (3, 16, 30)
    np.testing.assert_array_equal(a, x[:, 2:18, :])
    np.testing.assert_array_equal(b, y[:, :, 5:35])
    with pytest.raises(ConfigError, match="accepted"):
        match_sizes(x, y, "stretch")
    same = rng.random((3, 20, 30), dtype=np.float32)
    assert match_sizes(x, same, "error")[1] is same


def test_resize_and_crop_helpers():
    x = np.full((3, 8, 8), 0.5, np.float32)
    np.testing.assert_allclose(resize(x, (4, 6)), 0.5, atol=1e-6)
    assert center_crop(x, (2, 4)).shape == (3, 2, 4)


def test_decode_bytes_is_decode_of_the_same_file(tmp_path):
    from PIL import Image

    from perceptual_engine.images import decode, decode_bytes

    path = tmp_path / "rgba.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (37, 45, 4), dtype=np.uint8), "RGBA").save(path)
    got = decode_bytes(path.read_bytes(), "rgba.png", formats=("PNG",))
    np.testing.assert_array_equal(got, decode(path))
    gif = tmp_path / "x.gif"
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(gif)
    with pytest.raises(ImageError, match="is a GIF file; accepted formats: PNG"):
        decode_bytes(gif.read_bytes(), "x.gif", formats=("PNG",))
    with pytest.raises(ImageError, match="empty"):
        decode_bytes(b"", "a")
    with pytest.raises(ImageError, match="over the budget"):
        decode_bytes(path.read_bytes(), "rgba.png", max_pixels=100)
