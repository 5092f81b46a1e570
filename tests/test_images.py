"""stages.dataset.images: every supported format and mode to RGB by the documented rules, EXIF orientation, the resize
rule, unreadable files (raise or skip), the JPEG fast path giving the same pixels as Pillow, and hostile files:
formats we do not list, decompression bombs, thin strips, big photos (peak memory measured), special files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.base.runtime import PipelineError
from stages.dataset import images
from stages.dataset.images import (NOT_AN_IMAGE, DecodeLimits, ImageDecodeError, decode_image, decode_images,
                                   is_image_name, load_image)

from imagefolders import image_bytes, quadrants_image, solid_image, with_exif_orientation

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec); the pinned version still has them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)


def pixel(tensor: torch.Tensor, row: int, col: int) -> tuple[int, ...]:
    return tuple(tensor[:, row, col].tolist())


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def test_image_names_any_case() -> None:
    for name in ("a.jpg", "B.JPG", "c.Jpeg", "d.PNG", "e.bmp", "f.GIF", "g.webp", "h.TIF", "i.tiff"):
        assert is_image_name(name), name
    for name in ("notes.txt", "Thumbs.db", "desktop.ini", "photo.jpg.bak", "archive.zip", "noextension"):
        assert not is_image_name(name), name


def test_rgb_png_keeps_exact_pixels() -> None:
    array = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    decoded = decode_image(image_bytes(Image.fromarray(array, "RGB"), "PNG"), 16, "x.png")
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 16, 16)
    assert torch.equal(decoded, torch.from_numpy(array).permute(2, 0, 1))


def _grey16() -> Image.Image:
    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    return Image.fromarray(values)


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([200, 30, 30, 0, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 8, 4))  # the top half uses index 1: transparent (and black underneath)
    image.info["transparency"] = 1
    return image


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize("name, data, checks", [
    # (row, col) -> expected RGB; tolerance below is for lossy formats only
    ("grey.png", image_bytes(Image.new("L", (8, 8), 100), "PNG"), {(0, 0): (100, 100, 100)}),
    ("bilevel.png", image_bytes(Image.new("1", (8, 8), 1), "PNG"), {(3, 3): WHITE}),
    ("grey-alpha.png", image_bytes(Image.new("LA", (8, 8), (100, 0)), "PNG"), {(0, 0): WHITE}),
    ("grey-opaque.png", image_bytes(Image.new("LA", (8, 8), (100, 255)), "PNG"), {(0, 0): (100, 100, 100)}),
    ("rgba.png", image_bytes(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG"), {(0, 0): (255, 127, 127)}),
    ("clear.png", image_bytes(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), {(0, 0): WHITE}),
    ("palette.png", image_bytes(Image.new("RGB", (8, 8), (10, 120, 250)).convert("P", palette=Image.Palette.ADAPTIVE),
                                "PNG"),
     {(0, 0): (10, 120, 250)}),
    ("palette-transparent.png", image_bytes(_palette_with_transparency(), "PNG"),
     {(0, 0): WHITE, (7, 7): (200, 30, 30)}),
    ("palette-transparent.gif", image_bytes(_palette_with_transparency(), "GIF", transparency=1),
     {(0, 0): WHITE, (7, 7): (200, 30, 30)}),
    ("grey16.png", image_bytes(_grey16(), "PNG"),
     {(0, 0): (0, 0, 0), (0, 7): (128, 128, 128), (7, 0): WHITE, (7, 7): (1, 1, 1)}),
    ("grey16.tif", image_bytes(_grey16(), "TIFF"), {(0, 7): (128, 128, 128), (7, 0): WHITE}),
    ("cmyk.tif", image_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"), {(0, 0): RED}),
    ("cmyk.jpg", image_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), {(4, 4): RED}),
    ("rgb.bmp", image_bytes(Image.new("RGB", (8, 8), (1, 2, 3)), "BMP"), {(0, 0): (1, 2, 3)}),
    ("rgb.webp", image_bytes(Image.new("RGB", (8, 8), (1, 2, 3)), "WEBP", lossless=True), {(0, 0): (1, 2, 3)}),
    ("rgba.webp", image_bytes(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "WEBP", lossless=True), {(0, 0): WHITE}),
    ("animated.gif", _animated_gif(), {(4, 4): RED}),
    ("grey.jpg", image_bytes(Image.new("L", (8, 8), 100), "JPEG", quality=95), {(4, 4): (100, 100, 100)}),
])
def test_modes_and_formats_convert_to_rgb(name: str, data: bytes, checks: dict) -> None:
    decoded = decode_image(data, 8, name)
    assert decoded.shape == (3, 8, 8) and decoded.dtype == torch.uint8
    tolerance = 3 if name.endswith(".jpg") else 1  # alpha compositing rounds; JPEG is lossy
    for (row, col), expected in checks.items():
        assert close(pixel(decoded, row, col), expected, tolerance), (name, row, col, pixel(decoded, row, col))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # JPEG: torchvision's fast path; PNG: Pillow
def test_exif_orientation_is_applied(fmt: str) -> None:
    """64x32 quadrants tagged 'rotate 90 degrees clockwise' (6) display as 32x64: the left column becomes the top
    row. Resized to 32 (no-op) and centre-cropped, the corners then show blue, red / yellow, green."""
    upright = decode_image(image_bytes(quadrants_image(64, 32), fmt, quality=95) if fmt == "JPEG"
                           else image_bytes(quadrants_image(64, 32), fmt), 32, "upright")
    assert [close(pixel(upright, r, c), e, 40) for (r, c), e in
            {(2, 2): RED, (2, 29): GREEN, (29, 2): BLUE, (29, 29): YELLOW}.items()] == [True] * 4
    rotated = decode_image(with_exif_orientation(quadrants_image(64, 32), 6, fmt, **(
        {"quality": 95} if fmt == "JPEG" else {})), 32, "rotated")
    corners = {(2, 2): BLUE, (2, 29): RED, (29, 2): YELLOW, (29, 29): GREEN}
    assert all(close(pixel(rotated, r, c), e, 40) for (r, c), e in corners.items()), rotated[:, ::8, ::8]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_fast_path_matches_pillow(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    smooth = np.kron(rng.integers(0, 256, (6, 9, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 48 x 72 blocks
    noisy = np.clip(smooth.astype(int) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    data = with_exif_orientation(Image.fromarray(noisy, "RGB"), orientation, "JPEG", quality=80)
    fast = decode_image(data, 40, "photo.jpg")
    pillow = images.resize_square(images._decode_pil(data), 40)
    assert fast.shape == pillow.shape == (3, 40, 40)
    assert (fast.int() - pillow.int()).abs().max().item() <= 2


def test_centre_square_then_resize() -> None:
    columns = np.tile(np.arange(35, dtype=np.uint8), (32, 1))  # pixel value = its column, 35 wide x 32 high
    decoded = decode_image(image_bytes(Image.fromarray(columns, "L"), "PNG"), 32, "wide.png")
    assert decoded.shape == (3, 32, 32)
    assert decoded[0, 0, 0].item() == 1 and decoded[0, 0, 31].item() == 32  # the odd extra column is on the right
    bands = np.zeros((32, 96, 3), dtype=np.uint8)
    bands[:, :32], bands[:, 32:64], bands[:, 64:] = RED, GREEN, BLUE
    middle = decode_image(image_bytes(Image.fromarray(bands, "RGB"), "PNG"), 32, "bands.png")
    assert (middle == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()
    # The crop comes first: a 48 x 64 picture becomes its centre 48 x 48 square, which is then resized to 24.
    array = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    decoded = decode_image(image_bytes(Image.fromarray(array, "RGB"), "PNG"), 24, "photo.png")
    square = torch.from_numpy(array).permute(2, 0, 1)[:, :, 8:56]
    expected = images.F.resize(square, [24, 24], interpolation=images.InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("size, shape", [((33, 17), 8), ((17, 33), 8), ((5, 3), 16), ((640, 480), 24)])
def test_odd_sizes_become_squares(size: tuple[int, int], shape: int) -> None:
    decoded = decode_image(image_bytes(solid_image((10, 200, 90), size), "PNG"), shape, "odd.png")
    assert decoded.shape == (3, shape, shape)
    assert (decoded == torch.tensor([10, 200, 90], dtype=torch.uint8).view(3, 1, 1)).all()  # a flat colour stays


def test_upscaling_uses_bilinear_resize() -> None:
    array = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    decoded = decode_image(image_bytes(Image.fromarray(array, "RGB"), "PNG"), 32, "small.png")
    expected = torch.nn.functional.interpolate(torch.from_numpy(array).permute(2, 0, 1)[None].float(), size=32,
                                               mode="bilinear", align_corners=False, antialias=True)[0]
    assert (decoded.int() - expected.round().int()).abs().max().item() <= 1


@pytest.mark.parametrize("data, reason", [
    (b"definitely not an image", "not a JPEG, PNG, BMP, GIF, WebP or TIFF image"),
    (b"", "empty file"),
    (image_bytes(solid_image(RED, (40, 40), noise=30), "JPEG")[:300], "truncated"),
    (image_bytes(solid_image(RED, (40, 40), noise=30), "PNG")[:100], "truncated"),
])
def test_unreadable_files_name_the_file(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=rf"(?i)^broken\.png: cannot read image \(.*{reason}"):
        decode_image(data, 8, "broken.png")


def test_decode_images_raise_or_skip() -> None:
    good = image_bytes(Image.new("RGB", (8, 8), RED), "PNG")
    blobs, names = [good, b"garbage", good], ["a.png", "cat/bad.png", "c.png"]
    with pytest.raises(ImageDecodeError, match=r"^cat/bad\.png: cannot read image"):
        decode_images(blobs, names, 8, "raise")
    decoded, kept, skipped = decode_images(blobs, names, 8, "skip")
    assert decoded.shape == (2, 3, 8, 8) and kept == [0, 2]
    assert skipped == [{"file": "cat/bad.png", "reason": "not a JPEG, PNG, BMP, GIF, WebP or TIFF image"}]


def test_decode_images_many_mixed_files_match_one_by_one() -> None:
    """More files than one chunk, mixed formats and sizes: the batch result keeps the input order and equals
    decoding each file alone (what predict does), and a bad file deep in the list is found."""
    blobs, names = [], []
    for number in range(300):
        image = solid_image(((number * 7) % 256, (number * 13) % 256, 90), (10 + number % 3, 12), noise=5,
                            seed=number)
        blobs.append(image_bytes(image, "JPEG" if number % 2 else "PNG"))
        names.append(f"{number}.img")
    blobs[280] = b"\xff\xd8\xff broken jpeg"
    decoded, kept, skipped = decode_images(blobs, names, 8, "skip")
    assert kept == [i for i in range(300) if i != 280] and [s["file"] for s in skipped] == ["280.img"]
    for position, index in enumerate(kept[::37]):
        assert torch.equal(decoded[kept.index(index)], decode_image(blobs[index], 8, names[index])), index
    with pytest.raises(ImageDecodeError, match="^280.img"):
        decode_images(blobs, names, 8, "raise")


def test_load_image_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "Photo.JPG"
    path.write_bytes(image_bytes(Image.new("RGB", (20, 10), BLUE), "JPEG", quality=95))
    assert close(pixel(load_image(path, 8), 4, 4), BLUE, 3)
    with pytest.raises(PipelineError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png", 8)


# ---------------------------------------------------------------- hostile and unusual files


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_a_postscript_file_named_jpg_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow alone would open this as EPS and run Ghostscript on it; our decoder asks only the listed formats."""
    from PIL import EpsImagePlugin

    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # the danger is real: Pillow recognises it
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was run"))
    with pytest.raises(ImageDecodeError, match=rf"^photo\.jpg: cannot read image \({NOT_AN_IMAGE}\)$"):
        decode_image(EPS, 8, "photo.jpg")
    _, kept, skipped = decode_images([EPS], ["photo.jpg"], 8, "skip")
    assert kept == [] and skipped == [{"file": "photo.jpg", "reason": NOT_AN_IMAGE}]


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small valid JPEG whose start-of-frame header is patched to declare width x height."""
    data = bytearray(image_bytes(solid_image(RED, (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_decompression_bomb_is_refused_before_decoding(fmt: str) -> None:
    """65500 x 65500 would decode to 12.9 GB; the header is enough to refuse it, for JPEG as for Pillow's formats."""
    if fmt == "JPEG":
        data = jpeg_declaring(65500, 65500)
    else:  # a PNG whose header chunk declares 65500 x 65500 (with a valid CRC; the data after it is never read)
        data = bytearray(image_bytes(solid_image(RED, (16, 16)), "PNG"))
        data[16:24] = (65500).to_bytes(4, "big") * 2
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
        data = bytes(data)
    message = r"^bomb: cannot read image \(65500x65500 pixels, over the limit of 90 megapixels per image"
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, 32, "bomb")
    with pytest.raises(ImageDecodeError, match=r"over the limit of 0.0002 megapixels"):
        decode_image(image_bytes(solid_image(RED, (20, 20)), fmt), 8, "bomb", DecodeLimits(max_pixels=200))


def test_a_file_over_the_byte_limit_is_refused(tmp_path: Path) -> None:
    data = image_bytes(solid_image(RED, (64, 64), noise=40), "PNG")
    limits = DecodeLimits(max_bytes=len(data) - 1)
    with pytest.raises(ImageDecodeError, match=rf"^big.png: cannot read image \({len(data):,} bytes, over the limit"):
        decode_image(data, 8, "big.png", limits)
    (tmp_path / "big.png").write_bytes(data)
    with pytest.raises(ImageDecodeError, match=r"big.png: cannot read image .*data.limits.image_mb"):
        load_image(tmp_path / "big.png", 8, limits)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(PipelineError, match=r"pipe.png: not a regular file"):
        load_image(tmp_path / "pipe.png", 8)


def peak_memory_mb(code: str) -> float:
    """Extra peak resident memory (MB) of running `code` in a fresh interpreter after its imports: the numbers
    are the process's own, not estimates. The code gets `images`, `torch`, `np`, `Image`, `io` and `blob()`."""
    program = textwrap.dedent("""
        import io, resource, sys
        import numpy as np, torch
        from PIL import Image
        from stages.dataset import images
        torch.set_num_threads(1)
        def blob(width, height, fmt):
            ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
            out = io.BytesIO(); Image.fromarray(ramp, "RGB").save(out, fmt, quality=90); return out.getvalue()
        SETUP
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        CODE
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    setup, _, body = code.partition("---\n")
    program = program.replace("SETUP", textwrap.indent(textwrap.dedent(setup), "").strip())
    program = program.replace("CODE", textwrap.dedent(body).strip())
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_a_thin_strip_costs_no_memory() -> None:
    """100000 x 1 used to be scaled to 3.2 million x 32 before cropping (473 MB); now its 1 x 1 centre is resized."""
    strip = image_bytes(solid_image(GREEN, (100_000, 1)), "PNG")
    decoded = decode_image(strip, 32, "strip.png")
    assert decoded.shape == (3, 32, 32) and (decoded == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()
    extra = peak_memory_mb("""
        strip = blob(100_000, 1, "PNG")
        ---
        images.decode_image(strip, 32, "strip.png")
    """)
    assert extra < 20, f"a 100000 x 1 strip took {extra:.0f} MB"


def test_forty_phone_photos_decode_within_a_small_budget() -> None:
    """40 JPEGs of 4000 x 3000 (12 MP, the README's pets example) at 32 px: at full size they would hold 1.4 GB;
    libjpeg's reduced-scale decoding and resizing each photo as it comes keep the peak far below that."""
    extra = peak_memory_mb("""
        photo = blob(4000, 3000, "JPEG")
        ---
        out, kept, skipped = images.decode_images([photo] * 40, [f"{i}.jpg" for i in range(40)], 32)
        assert out.shape == (40, 3, 32, 32) and not skipped
    """)
    assert extra < 150, f"40 photos of 12 MP took {extra:.0f} MB at peak"


def test_reduced_scale_decoding_gives_the_same_picture() -> None:
    """A big JPEG decoded at 1/8 scale and resized matches the full decode resized, up to JPEG-level noise (and
    the crop snapping to the reduced grid: at most half a reduced pixel, 4 pixels of this 600 x 800 picture)."""
    rows, cols = np.meshgrid(np.linspace(0, 1, 600), np.linspace(0, 1, 800), indexing="ij")
    smooth = (np.stack([rows, cols, np.sin(6 * rows + 4 * cols) / 2 + 0.5], -1) * 255).astype(np.uint8)
    data = image_bytes(Image.fromarray(smooth, "RGB"), "JPEG", quality=90)
    reduced = decode_image(data, 48, "big.jpg")
    full = images.resize_square(images.decode_jpeg(images._as_tensor(data)), 48)
    assert reduced.shape == full.shape == (3, 48, 48)
    assert (reduced.float() - full.float()).abs().mean().item() < 3
