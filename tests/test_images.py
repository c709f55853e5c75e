"""Image loading, preprocessing geometry and normalization, bundled samples."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.core.images import (
    PHOTO_NAMES,
    TEXTURE_NAMES,
    Preprocess,
    load_image,
    load_images,
    sample_image,
    sample_images,
)
from convscope.errors import ConvscopeError, ImageLoadError

IMAGENET = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def position_image(w: int, h: int) -> Image.Image:
    """RGB image whose red channel is the column index and green the row index."""
    ys, xs = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 7)], axis=2).astype(np.uint8))


def noise_image(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- Preprocess


def test_normalize_exact_pixel_value():
    img = Image.new("RGB", (2, 2), (255, 128, 0))
    x = IMAGENET(img)
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    assert x.dtype == torch.float32 and x.shape == (3, 2, 2)
    assert torch.allclose(x[:, 1, 0], torch.tensor(expected), atol=1e-6)


def test_normalize_denormalize_round_trip_batch_and_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64)
    y = IMAGENET.normalize(x)
    assert y.dtype == torch.float64
    assert torch.allclose(y[1, 2], (x[1, 2] - 0.406) / 0.225)
    assert torch.allclose(IMAGENET.denormalize(y), x, atol=1e-12)
    # denormalize does not clamp: an out-of-range input stays out of range
    assert IMAGENET.denormalize(torch.full((3, 1, 1), 10.0)).max() > 1


def test_identity_is_plain_rgb():
    img = position_image(9, 5)
    x = Preprocess.identity()(img)
    assert x.shape == (3, 5, 9)
    assert torch.equal(x * 255, torch.from_numpy(np.array(img)).permute(2, 0, 1).float())
    assert Preprocess.identity().input_size is None


def test_resize_short_side_landscape_and_portrait():
    pre = Preprocess(resize=10)
    assert pre(Image.new("RGB", (40, 20))).shape == (3, 10, 20)
    assert pre(Image.new("RGB", (20, 50))).shape == (3, 25, 10)


def test_center_crop_selects_centre_pixels():
    img = position_image(10, 8)
    x = Preprocess(crop=(4, 6))(img) * 255
    # left = (10 - 6) / 2 = 2, top = (8 - 4) / 2 = 2
    expected_cols = torch.arange(2, 8, dtype=torch.float32).expand(4, 6)
    expected_rows = torch.arange(2, 6, dtype=torch.float32)[:, None].expand(4, 6)
    assert torch.allclose(x[0], expected_cols) and torch.allclose(x[1], expected_rows)


def test_resize_then_crop_geometry():
    # a 200 x 100 ramp (red = column); resize short side 100 -> 50 halves everything,
    # crop 50 keeps resized columns 25..74, i.e. original columns ~2j + 0.5
    img = position_image(200, 100)
    pre = Preprocess(resize=50, crop=50)
    assert pre.input_size == (50, 50)
    x = pre(img)[0] * 255
    assert x.shape == (50, 50)
    j = torch.arange(25, 75, dtype=torch.float32)
    assert torch.allclose(x[25, 5:-5], 2 * j[5:-5] + 0.5, atol=1.5)


def test_crop_larger_than_image_names_the_fix():
    with pytest.raises(ConvscopeError, match="resize"):
        Preprocess(crop=50)(Image.new("RGB", (20, 20)))


def test_preprocess_equality_hash_and_validation():
    a = Preprocess(resize=256, crop=224, mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25))
    b = Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25])
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != Preprocess(resize=256, crop=224)
    assert Preprocess(crop=(3, 4)).input_size == (3, 4)
    for bad in ({"std": (1, 0, 1)}, {"resize": 0}, {"crop": (1, 2, 3)}, {"mean": (0, 0)}):
        with pytest.raises(ConvscopeError):
            Preprocess(**bad)
    with pytest.raises(ConvscopeError):
        IMAGENET.normalize(torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------- load_image: conversions


@pytest.mark.parametrize(("orientation", "corner"), [(6, "top-right"), (8, "bottom-left")])
def test_exif_orientation_applied(tmp_path, orientation, corner):
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 12, 12))  # red mark at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", quality=95, exif=exif)
    out = load_image(path)
    assert out.size == (40, 60)  # transposed
    a = np.asarray(out).astype(int)
    corners = {"top-left": a[2, 2], "top-right": a[2, -3], "bottom-left": a[-3, 2], "bottom-right": a[-3, -3]}
    for name, px in corners.items():
        is_red = px[0] > 200 and px[2] < 60
        assert is_red == (name == corner), (name, px)


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535, 257 * 100]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (1, 4, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[0, :, 0].tolist() == [0, 128, 255, 100]


def test_rgba_composited_on_white(tmp_path):
    arr = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(arr, "RGBA").save(path)
    out = np.asarray(load_image(path)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]
    assert np.abs(out[0, 2] - 255 * (1 - 128 / 255)).max() <= 1


def test_palette_transparency_and_gif_first_frame(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    path = tmp_path / "t.png"
    pal.save(path, transparency=0)
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 0, 0] and out[3, 3].tolist() == [255, 255, 255]

    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    assert np.asarray(load_image(gif))[4, 4].tolist() == [255, 0, 0]


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    gpath = tmp_path / "g.png"
    gray.save(gpath)
    out = np.asarray(load_image(gpath))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        assert (out[..., c] == np.asarray(gray)).all()

    cpath = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cpath, quality=95)
    px = np.asarray(load_image(cpath))[4, 4].astype(int)
    assert px[0] > 230 and px[1] < 25 and px[2] < 25  # pure red


def test_other_formats(tmp_path):
    img = Image.new("RGB", (5, 3), (10, 200, 30))
    for ext in ("bmp", "tiff", "webp", "png"):
        path = tmp_path / f"x.{ext}"
        img.save(path, lossless=True) if ext == "webp" else img.save(path)
        assert np.asarray(load_image(path))[1, 2].tolist() == [10, 200, 30], ext


# ---------------------------------------------------------------- load_image: errors


def _png_with_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels (the pixel data is missing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _error_cases(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n" * 20)
    for ext in ("jpg", "png"):
        full = tmp_path / f"full.{ext}"
        noise_image().save(full)
        data = full.read_bytes()
        (tmp_path / f"half.{ext}").write_bytes(data[: len(data) // 2])
    (tmp_path / "bomb.png").write_bytes(_png_with_header(100_000, 100_000))
    return {
        "missing": (tmp_path / "nope.jpg", "no such file"),
        "directory": (tmp_path / "folder.jpg", "directory"),
        "empty": (tmp_path / "empty.png", "empty"),
        "not an image": (tmp_path / "text.jpg", "not an image"),
        "truncated jpeg": (tmp_path / "half.jpg", "truncated"),
        "truncated png": (tmp_path / "half.png", "truncated"),
        "bomb header": (tmp_path / "bomb.png", "max_pixels"),
    }


def test_each_bad_file_raises_image_load_error_naming_it(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    for case, (path, words) in _error_cases(tmp_path).items():
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        msg = str(info.value)
        assert str(path) in msg, case
        assert words in msg.lower(), (case, msg)
    assert limit == Image.MAX_IMAGE_PIXELS


def test_max_pixels_checked_before_decoding(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(ImageLoadError, match="max_pixels=10000") as info:
        load_image(path, max_pixels=5000)
    assert str(path) in str(info.value)
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def test_huge_max_pixels_does_not_leak_pil_limit(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(30_000, 30_000))  # 9e8 pixels: over PIL's own error limit
    with pytest.raises(ImageLoadError, match="truncated|corrupt"):  # passes the size check, no data
        load_image(path, max_pixels=10**9)
    assert limit == Image.MAX_IMAGE_PIXELS


# ---------------------------------------------------------------- load_images


def test_load_images_folder_sorted_identity(tmp_path):
    colors = {"b.png": (0, 255, 0), "a.jpg": (255, 0, 0), "c.bmp": (0, 0, 255)}
    for name, col in colors.items():
        Image.new("RGB", (6, 4), col).save(tmp_path / name, quality=100)
    (tmp_path / "notes.txt").write_text("ignored")
    x = load_images(tmp_path)
    assert x.shape == (3, 3, 4, 6) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1  # no silent ImageNet normalization
    dominant = x.mean(dim=(2, 3)).argmax(dim=1).tolist()
    assert dominant == [0, 1, 2]  # a.jpg red, b.png green, c.bmp blue


def test_load_images_size_mismatch_and_preprocess(tmp_path):
    Image.new("RGB", (10, 8)).save(tmp_path / "small.png")
    Image.new("RGB", (20, 30)).save(tmp_path / "big.png")
    paths = [tmp_path / "small.png", str(tmp_path / "big.png")]
    with pytest.raises(ConvscopeError, match="crop"):
        load_images(paths)
    assert load_images(paths, Preprocess(resize=8, crop=8)).shape == (2, 3, 8, 8)


def test_load_images_uses_model_preprocess_or_identity(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (4, 4), (255, 255, 255)).save(path)

    class Model(torch.nn.Module):
        preprocess = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    assert torch.allclose(load_images(path, Model()), torch.ones(1, 3, 4, 4))  # (1 - .5) / .5
    assert torch.allclose(load_images([path], torch.nn.Conv2d(3, 1, 1)), torch.ones(1, 3, 4, 4))
    with pytest.raises(ConvscopeError):
        load_images([])
    with pytest.raises(ImageLoadError, match="no image files"):
        load_images(_empty_dir(tmp_path))


def _empty_dir(tmp_path):
    d = tmp_path / "empty_dir"
    d.mkdir()
    return d


# ---------------------------------------------------------------- samples


def test_sample_images_found_and_loadable():
    found = sample_images()
    for name in ("chelsea", "coffee", "china"):
        assert name in found and found[name].is_file()
    assert set(found) <= set(PHOTO_NAMES) | set(TEXTURE_NAMES)
    assert load_image(found["chelsea"]).size == (451, 300)
    assert load_image(found["china"]).size == (640, 427)
    x = load_images([found["coffee"]], Preprocess(resize=32, crop=32))
    assert x.shape == (1, 3, 32, 32)
    for name in TEXTURE_NAMES:
        if name in found:
            t = np.asarray(load_image(found[name]))
            assert t.ndim == 3 and (t[..., 0] == t[..., 2]).all()


def test_sample_image_unknown_name_lists_valid_ones():
    assert sample_image("chelsea") == sample_images()["chelsea"]
    with pytest.raises(ConvscopeError) as info:
        sample_image("chelsae")
    msg = str(info.value)
    assert "chelsea" in msg and "coffee" in msg and "brick" in msg
