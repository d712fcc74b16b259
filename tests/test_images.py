"""Images and masks: every Pillow mode to (3, H, W) in [0, 1], bad files named, paths confined."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pipeline.data.images import DataError, load_image, load_mask
from pipeline.storage.paths import PathEscapeError, join_under
from tests._data_helpers import (
    COMMIT,
    image_bytes,
    make_hf_cache,
    moto_server,
    noise_rgb,
    s3_put,
    save_image,
    use_hf_cache,
    use_s3,
)

H, W = 6, 8  # small originals: values are checked pixel by pixel


def _gray(value: int, dtype: type = np.uint8) -> np.ndarray:
    return np.full((H, W), value, dtype)


def _expect(img: Image.Image) -> torch.Tensor:
    """What an 8-bit image should decode to: Pillow's RGB conversion, scaled to [0, 1]."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _rgb() -> np.ndarray:
    return noise_rgb(H, W, seed=1)


def _palette() -> Image.Image:
    return Image.fromarray(_rgb()).quantize(colors=16)


CASES = {
    "RGB": lambda: Image.fromarray(_rgb()),
    "L": lambda: Image.fromarray(_gray(77)),
    "1": lambda: Image.fromarray(_gray(255)).convert("1"),
    "LA": lambda: Image.fromarray(np.dstack([_gray(90), _gray(0)])),  # alpha 0 is dropped
    "RGBA": lambda: Image.fromarray(np.dstack([_rgb(), _gray(0)])),
    "P": _palette,
    "CMYK": lambda: Image.fromarray(_rgb()).convert("CMYK"),
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_eight_bit_modes_decode_to_rgb_in_unit_range(tmp_path: Path, mode: str) -> None:
    img = CASES[mode]()
    assert img.mode == mode
    fmt = "TIFF" if mode == "CMYK" else "PNG"  # lossless either way
    save_image(tmp_path / "x.img", img, fmt)
    x, original = load_image("x.img", str(tmp_path), (H, W), image_id="x")
    assert original == (H, W)
    assert x.dtype == torch.float32 and x.shape == (3, H, W)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    torch.testing.assert_close(x, _expect(img), rtol=0, atol=1e-6)


def test_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    pixels = np.zeros((H, W, 4), np.uint8)
    pixels[..., :3] = (10, 20, 30)  # fully transparent, but the colour stays
    save_image(tmp_path / "a.png", pixels)
    x, _ = load_image("a.png", str(tmp_path), (H, W))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255.0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_keeps_its_precision(tmp_path: Path, fmt: str) -> None:
    img = Image.fromarray(_gray(30000, np.uint16))
    assert img.mode == "I;16"
    save_image(tmp_path / "g.img", img, fmt)
    x, _ = load_image("g.img", str(tmp_path), (H, W))
    torch.testing.assert_close(x, torch.full((3, H, W), 30000 / 65535))  # 0.457771..., not /255


def test_thirty_two_bit_int_and_float_gray(tmp_path: Path) -> None:
    save_image(tmp_path / "i.tif", Image.fromarray(_gray(65535, np.int32)), "TIFF")
    x, _ = load_image("i.tif", str(tmp_path), (H, W))
    assert torch.equal(x, torch.ones(3, H, W))
    save_image(tmp_path / "f.tif", Image.fromarray(np.full((H, W), 0.25, np.float32)), "TIFF")
    x, _ = load_image("f.tif", str(tmp_path), (H, W))
    assert torch.equal(x, torch.full((3, H, W), 0.25))


def test_resize_is_bilinear_and_antialiased(tmp_path: Path) -> None:
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-pixel checks
    save_image(tmp_path / "c.png", checker)
    x, original = load_image("c.png", str(tmp_path), (16, 8))
    assert original == (64, 64) and x.shape == (3, 16, 8)
    # Antialiasing averages the checks to mid-grey; point sampling would give 0 or 1.
    assert torch.allclose(x, torch.full_like(x, 0.5), atol=0.02)
    save_image(tmp_path / "w.png", Image.fromarray(_gray(30000, np.uint16)))
    y, _ = load_image("w.png", str(tmp_path), (3, 5))
    torch.testing.assert_close(y, torch.full((3, 3, 5), 30000 / 65535))


def test_truncated_images_stay_an_error() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never flipped on import


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [("PNG", 0.5), ("PNG", -10), ("JPEG", 0.5), ("JPEG", -2), ("PNG", 0.0)],
    ids=["png-half", "png-no-end", "jpeg-half", "jpeg-no-eoi", "empty"],
)
def test_truncated_files_are_data_errors_naming_the_item(tmp_path: Path, fmt: str, keep) -> None:
    data = image_bytes(Image.fromarray(noise_rgb(64, 64)), fmt)
    cut = int(len(data) * keep) if isinstance(keep, float) else len(data) + keep
    (tmp_path / "t.img").write_bytes(data[:cut])
    with pytest.raises(DataError) as info:
        load_image("t.img", str(tmp_path), (H, W), image_id="kitchen/7")
    assert "'kitchen/7'" in str(info.value) and "t.img" in str(info.value)


def test_corrupt_and_missing_files_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(DataError, match=r"'img-1' \(c\.png\): cannot decode image"):
        load_image("c.png", str(tmp_path), (H, W), image_id="img-1")
    with pytest.raises(DataError, match=r"'img-2' \(nope\.png\): image file not found"):
        load_image("nope.png", str(tmp_path), (H, W), image_id="img-2")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="img-3"):
        load_image("dir.png", str(tmp_path), (H, W), image_id="img-3")


def test_paths_escaping_the_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save_image(root / "in.png", _rgb())
    save_image(tmp_path / "out.png", _rgb())
    for bad in ("../out.png", "sub/../../out.png", str(tmp_path / "out.png"), "s3://bkt/x.png"):
        with pytest.raises(DataError, match="outside the dataset root") as info:
            load_image(bad, str(root), (H, W), image_id="esc")
        assert "'esc'" in str(info.value)
    x, _ = load_image(str(root / "in.png"), str(root), (H, W))  # absolute but inside: fine
    y, _ = load_image("./sub/../in.png", str(root), (H, W))
    assert torch.equal(x, y)
    z, _ = load_image(str(tmp_path / "out.png"), None, (H, W))  # no root: as given
    assert z.shape == (3, H, W)


def test_join_under_uris() -> None:
    assert join_under("s3://bkt/val", "a/b.png") == "s3://bkt/val/a/b.png"
    assert join_under("s3://bkt/val/", "s3://bkt/val/a.png") == "s3://bkt/val/a.png"
    hf_root = f"hf://datasets/o/n@{COMMIT}/val"
    assert join_under(hf_root, "x/1.png") == f"{hf_root}/x/1.png"
    for bad in ("../other/a.png", "/etc/passwd", "s3://bkt/valx/a.png", "gs://bkt/val/a.png"):
        with pytest.raises(PathEscapeError):
            join_under("s3://bkt/val", bad)


# -- masks ----------------------------------------------------------------------------


def _mask_file(tmp_path: Path, img: Image.Image, name: str = "m.png") -> str:
    save_image(tmp_path / name, img)
    return name


def test_mask_any_nonzero_channel_is_foreground(tmp_path: Path) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[1, 2, 2] = 1  # blue only
    rgb[4, 5, 0] = 255
    m = load_mask(_mask_file(tmp_path, Image.fromarray(rgb)), None, str(tmp_path), (H, W), (H, W))
    assert m.dtype == torch.bool and m.shape == (H, W)
    assert m.nonzero().tolist() == [[1, 2], [4, 5]]


def test_mask_modes(tmp_path: Path) -> None:
    gray = np.zeros((H, W), np.uint8)
    gray[2:4, 3:6] = 1
    expected = torch.from_numpy(gray != 0)
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = 200  # coloured everywhere ...
    rgba[..., 3] = gray * 255  # ... but opaque only on the object
    palette = Image.fromarray(gray).convert("P")
    wide = Image.fromarray(gray.astype(np.uint16) * 1000)
    for img in (Image.fromarray(gray), Image.fromarray(rgba), palette, wide):
        name = _mask_file(tmp_path, img, f"m-{img.mode}.png")
        assert torch.equal(load_mask(name, None, str(tmp_path), (H, W), (H, W)), expected), img.mode


def test_mask_is_resized_nearest_and_may_be_empty(tmp_path: Path) -> None:
    big = np.zeros((64, 64), np.uint8)
    big[:32, :] = 255  # top half
    name = _mask_file(tmp_path, Image.fromarray(big))
    m = load_mask(name, None, str(tmp_path), (8, 4), (64, 64))
    assert m.shape == (8, 4) and m[:4].all() and not m[4:].any()
    empty = _mask_file(tmp_path, Image.fromarray(np.zeros((64, 64), np.uint8)), "e.png")
    assert not load_mask(empty, None, str(tmp_path), (8, 4), (64, 64)).any()  # not an error


def test_mask_size_must_match_the_image(tmp_path: Path) -> None:
    name = _mask_file(tmp_path, Image.fromarray(np.zeros((80, 100), np.uint8)))
    with pytest.raises(DataError, match="mask 100x80 does not match image 120x90") as info:
        load_mask(name, None, str(tmp_path), (H, W), (90, 120), image_id="im-9")
    assert "'im-9'" in str(info.value)


def test_missing_corrupt_or_escaping_masks(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'k' \(gone\.png\): mask file not found"):
        load_mask("gone.png", None, str(tmp_path), (H, W), (H, W), image_id="k")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="cannot decode mask"):
        load_mask("bad.png", None, str(tmp_path), (H, W), (H, W), image_id="k")
    with pytest.raises(DataError, match="outside the dataset root"):
        load_mask("../m.png", None, str(tmp_path), (H, W), (H, W), image_id="k")
    with pytest.raises(DataError, match="neither a mask nor a box"):
        load_mask(None, None, str(tmp_path), (H, W), (H, W), image_id="k")


def test_box_masks() -> None:
    m = load_mask(None, (2, 1, 5, 4), None, (H, W), (H, W))  # same size: exact slice
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[1:4, 2:5] = True
    assert torch.equal(m, expected)
    # 64x64 original -> 32x32 grid: pixel centres (i + 0.5) * 2 inside [20, 60) x [10, 50)
    m = load_mask(None, (10.0, 20.0, 50.0, 60.0), None, (32, 32), (64, 64))
    assert m.nonzero()[:, 0].unique().tolist() == list(range(10, 30))
    assert m.nonzero()[:, 1].unique().tolist() == list(range(5, 25))
    # a non-square resize scales each axis on its own
    m = load_mask(None, (0, 0, 100, 50), None, (10, 10), (100, 200))
    assert m[:5, :5].all() and not m[5:].any() and not m[:, 5:].any()
    assert not load_mask(None, (3, 3, 3, 3), None, (H, W), (H, W)).any()  # empty box: empty
    assert load_mask(None, (-5, -5, 99, 99), None, (H, W), (H, W)).all()  # clipped
    with pytest.raises(DataError, match="box"):
        load_mask(None, (5, 0, 1, 4), None, (H, W), (H, W), image_id="b")
    with pytest.raises(DataError, match="box"):
        load_mask(None, (float("nan"), 0, 1, 4), None, (H, W), (H, W), image_id="b")


def test_mask_file_wins_over_a_box(tmp_path: Path) -> None:
    name = _mask_file(tmp_path, Image.fromarray(np.zeros((H, W), np.uint8)))
    assert not load_mask(name, (0, 0, W, H), str(tmp_path), (H, W), (H, W)).any()


# -- images on remote stores ----------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as url:
        yield url


def test_images_and_masks_from_s3(s3_endpoint: str, monkeypatch, tmp_path: Path) -> None:
    use_s3(monkeypatch, s3_endpoint)
    img = Image.fromarray(noise_rgb(20, 30, seed=3))
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:25] = 255
    s3_put(
        s3_endpoint,
        "audit-images",
        {
            "val/kitchen/1.png": image_bytes(img, "PNG"),
            "val/masks/kitchen/1.png": image_bytes(Image.fromarray(mask), "PNG"),
            "val/kitchen/broken.jpg": image_bytes(img, "JPEG")[:200],
            "secret.png": image_bytes(img, "PNG"),
        },
    )
    root = "s3://audit-images/val"
    x, original = load_image("kitchen/1.png", root, (10, 15), image_id="k1")
    save_image(tmp_path / "kitchen" / "1.png", img)
    local, _ = load_image("kitchen/1.png", str(tmp_path), (10, 15))
    assert original == (20, 30) and torch.equal(x, local)
    m = load_mask("masks/kitchen/1.png", None, root, (10, 15), original, image_id="k1")
    assert int(m.sum()) == 3 * 10  # nearest: rows 5..9 -> 2..4, cols 5..24 -> 2..11
    with pytest.raises(DataError, match="image file not found"):
        load_image("kitchen/2.png", root, (10, 15), image_id="k2")
    with pytest.raises(DataError, match="cannot decode image"):
        load_image("kitchen/broken.jpg", root, (10, 15), image_id="k3")
    with pytest.raises(DataError, match="outside the dataset root"):
        load_image("../secret.png", root, (10, 15), image_id="k4")


def test_images_from_an_offline_hub_cache(tmp_path: Path, monkeypatch) -> None:
    img = Image.fromarray(noise_rgb(12, 12, seed=4))
    cache = tmp_path / "hub"
    make_hf_cache(cache, "owner/rooms", {"val/bath/1.png": image_bytes(img, "PNG")})
    use_hf_cache(monkeypatch, cache)
    x, _ = load_image("bath/1.png", f"hf://datasets/owner/rooms@{COMMIT}/val", (12, 12))
    torch.testing.assert_close(x, _expect(img), rtol=0, atol=0)
    with pytest.raises(DataError, match="not found"):
        load_image("bath/2.png", "hf://datasets/owner/rooms@main/val", (12, 12), image_id="b2")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


def test_images_over_http(tmp_path: Path) -> None:
    img = Image.fromarray(noise_rgb(9, 7, seed=5))
    save_image(tmp_path / "site" / "val" / "a.png", img)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "site"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        root = f"http://127.0.0.1:{server.server_address[1]}/val"
        x, original = load_image("a.png", root, (9, 7))
        assert original == (9, 7)
        torch.testing.assert_close(x, _expect(img), rtol=0, atol=0)
        with pytest.raises(DataError, match="image file not found"):
            load_image("b.png", root, (9, 7), image_id="b")
    finally:
        server.shutdown()
        thread.join()
