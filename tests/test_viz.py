from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from wsseg import viz
from wsseg.data.images import VOC_PALETTE


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _hue(rgb: np.ndarray) -> float:
    """HSV hue in [0, 1) of one uint8 RGB colour, via PIL (an independent implementation)."""
    pixel = Image.fromarray(rgb.reshape(1, 1, 3).astype(np.uint8)).convert("HSV")
    return np.asarray(pixel)[0, 0, 0] / 256.0


def _photo(height: int = 12, width: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_label_colors_use_the_voc_palette_and_void_colour():
    labels = np.array([[0, 1, 2], [15, 255, 1]], dtype=np.uint8)
    colors = viz.label_colors(labels)
    assert colors.shape == (2, 3, 3) and colors.dtype == np.uint8
    assert tuple(colors[0, 1]) == (128, 0, 0)  # VOC class 1 (aeroplane)
    assert tuple(colors[0, 0]) == (0, 0, 0)
    assert tuple(colors[0, 2]) == (0, 128, 0)
    assert tuple(colors[1, 1]) == tuple(VOC_PALETTE[255]) == (224, 224, 192)
    assert np.array_equal(colors, VOC_PALETTE[labels])


def test_label_colors_reject_out_of_range_ids():
    with pytest.raises(ValueError):
        viz.label_colors(np.array([[300]], dtype=np.int32))


def test_class_legend_names_present_classes_in_id_order():
    labels = np.array([[12, 0], [255, 12]], dtype=np.uint8)
    names = [f"c{i}" for i in range(1, 21)]
    assert viz.class_legend(labels, names) == [
        ("background", (0, 0, 0)),
        ("c12", tuple(int(c) for c in VOC_PALETTE[12])),
        ("void", (224, 224, 192)),
    ]


def test_overlay_alpha_zero_is_the_image_and_one_is_the_colours():
    image, colors = _photo(), _photo()[::-1].copy()
    assert np.array_equal(viz.overlay(image, colors, alpha=0.0), image)
    assert np.array_equal(viz.overlay(image, colors, alpha=1.0), colors)
    half = viz.overlay(image, colors, alpha=0.5)
    expected = np.rint((image.astype(float) + colors) / 2)
    assert np.abs(half.astype(float) - expected).max() <= 0.5 + 1e-9


def test_overlay_mask_limits_the_blend():
    image = np.zeros((4, 5, 3), np.uint8)
    colors = np.full((4, 5, 3), 200, np.uint8)
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    out = viz.overlay(image, colors, alpha=0.5, mask=mask)
    assert tuple(out[1, 2]) == (100, 100, 100)
    out[1, 2] = 0
    assert not out.any()


def test_heatmap_endpoints_differ_and_luminance_rises():
    ramp = np.linspace(0.0, 1.0, 256)[None, :]
    colors = viz.heatmap(ramp)
    assert colors.shape == (1, 256, 3) and colors.dtype == np.uint8
    assert np.abs(colors[0, 0].astype(int) - colors[0, -1]).sum() > 400  # near black vs pale yellow
    luminance = _luminance(colors[0].astype(float))
    coarse = luminance[::16]
    assert np.all(np.diff(coarse) > 0)
    assert np.all(np.diff(luminance) > -1.0)  # rounding to uint8 may jitter by < 1
    # values outside [0, 1] and NaN are clipped, not wrapped
    clipped = viz.heatmap(np.array([[-3.0, 0.0, 1.0, 7.0, np.nan]]))
    assert np.array_equal(clipped[0, 0], clipped[0, 1])
    assert np.array_equal(clipped[0, 2], clipped[0, 3])
    assert np.array_equal(clipped[0, 4], clipped[0, 1])


def test_cam_overlay_resizes_a_stride4_cam_to_the_image():
    image = _photo(16, 20)
    cam = np.zeros((4, 5))
    out = viz.cam_overlay(image, cam, alpha=0.0)
    assert out.shape == (16, 20, 3) and out.dtype == np.uint8
    assert np.array_equal(out, image)
    hot = viz.cam_overlay(np.zeros((16, 20, 3), np.uint8), np.ones((4, 5)), alpha=1.0)
    assert np.array_equal(hot, viz.heatmap(np.ones((16, 20))))


def test_instance_colors_are_distinct_stable_and_edged():
    ids = np.zeros((6, 12), np.int64)
    ids[1:5, 1:5] = 1
    ids[1:5, 5:9] = 2  # touches instance 1
    ids[1:5, 10:12] = 7
    colors = viz.instance_colors(ids)
    assert colors.shape == (6, 12, 3) and colors.dtype == np.uint8
    assert tuple(colors[0, 0]) == viz.INSTANCE_BACKGROUND
    interior = {k: tuple(colors[2, c]) for k, c in ((1, 2), (2, 6), (7, 11))}
    assert len(set(interior.values())) == 3
    # stable: the colour of an id does not depend on the rest of the map
    alone = viz.instance_colors(np.full((3, 3), 2, np.int64))
    assert tuple(alone[1, 1]) == interior[2]
    # the pixels where instances 1 and 2 meet are darker than their interiors
    assert _luminance(colors[2, 4].astype(float)) < 0.7 * _luminance(np.array(interior[1], float))
    assert _luminance(colors[2, 5].astype(float)) < 0.7 * _luminance(np.array(interior[2], float))


def test_displacement_colors_zero_is_white_and_opposites_differ_in_hue():
    disp = np.zeros((2, 1, 5))
    disp[:, 0, 1] = (0.0, 3.0)  # right
    disp[:, 0, 2] = (0.0, -3.0)  # left
    disp[:, 0, 3] = (3.0, 0.0)  # down
    disp[:, 0, 4] = (-3.0, 0.0)  # up
    colors = viz.displacement_colors(disp)
    assert colors.shape == (1, 5, 3) and colors.dtype == np.uint8
    assert tuple(colors[0, 0]) == (255, 255, 255)
    assert tuple(colors[0, 1]) == (255, 0, 0)  # full magnitude pointing right is pure red
    hues = [_hue(colors[0, i]) for i in range(1, 5)]
    for a, b in ((0, 1), (2, 3)):
        gap = abs(hues[a] - hues[b])
        assert min(gap, 1 - gap) > 0.45  # opposite directions: half the wheel apart
    # magnitude drives saturation: half length is paler than full length
    half = viz.displacement_colors(disp * 0.5, max_magnitude=3.0)
    assert half[0, 1].astype(int).sum() > colors[0, 1].astype(int).sum()


def test_displacement_colors_enlarge_to_the_image_shape():
    disp = np.random.default_rng(1).normal(size=(2, 3, 4))
    small = viz.displacement_colors(disp)
    big = viz.displacement_colors(disp, shape=(12, 16))
    assert big.shape == (12, 16, 3)
    assert np.array_equal(big[::4, ::4], small)


def test_displacement_wheel_centre_is_white():
    wheel = viz.displacement_wheel(33)
    assert wheel.shape == (33, 33, 3)
    assert tuple(wheel[16, 16]) == (255, 255, 255)
    assert tuple(wheel[16, 32]) == (255, 0, 0)  # right edge: pointing right


def test_displacement_arrows_draw_from_start_to_target():
    image = np.full((48, 48, 3), 128, np.uint8)
    disp = np.zeros((2, 12, 12))
    assert np.array_equal(viz.displacement_arrows(image, disp, step=48, min_height=48), image)
    disp[1, 6, 6] = 4.0  # the cell under (24, 24) points 4 stride-4 px = 16 image px right
    out = viz.displacement_arrows(image, disp, step=48, min_height=48)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.abs(out.astype(int) - image).sum(axis=-1) > 30
    rows, cols = np.nonzero(changed)
    assert 20 <= rows.min() and rows.max() <= 29  # a horizontal arrow (the head is widest)
    shaft = np.nonzero(changed[:, 30])[0]
    assert 22 <= shaft.min() and shaft.max() <= 27  # the shaft is thin, centred on row 24.5
    assert 22 <= cols.min() <= 25 and 39 <= cols.max() <= 43
    assert not changed[:, :20].any()  # nothing drawn to the left of the start
    # small images are upscaled by an integer factor before drawing
    assert viz.displacement_arrows(image, disp, step=48, min_height=100).shape == (144, 144, 3)


def test_boundary_image_is_dark_on_white():
    boundary = np.array([[0.0, 1.0, 0.5]])
    out = viz.boundary_image(boundary)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [255, 0, 128]
    assert viz.boundary_image(np.zeros((4, 5)), shape=(16, 20)).shape == (16, 20, 3)


def test_resize_to_keeps_aspect_and_nearest_keeps_labels():
    labels = viz.label_colors(np.array([[1, 2], [3, 4]], np.uint8))
    big = viz.resize_to(labels, 6)
    assert big.shape == (6, 6, 3)
    assert set(map(tuple, big.reshape(-1, 3))) == set(map(tuple, labels.reshape(-1, 3)))
    photo = viz.resize_to(_photo(10, 30), 20, smooth=True)
    assert photo.shape == (20, 60, 3) and photo.dtype == np.uint8


def test_tile_upscales_small_images_and_draws_a_legible_title():
    image = _photo(10, 16)
    out = viz.tile("hello", image, min_height=30)
    # 10 rows -> x3 = 30 rows, + 1 px frame each side; width 48 + 2
    assert out.dtype == np.uint8 and out.shape[1] == 50
    title_height = out.shape[0] - 32
    assert title_height > 10
    body = out[title_height + 1 : title_height + 31, 1:49]
    assert np.array_equal(body, np.repeat(np.repeat(image, 3, axis=0), 3, axis=1))
    strip = out[:title_height]
    assert tuple(strip[0, 0]) == viz.TITLE_BACKGROUND
    assert (strip.max(axis=-1) < 80).sum() > 10  # dark text pixels on the light strip
    empty = viz.tile("", image, min_height=30)
    assert (empty[:title_height].max(axis=-1) < 80).sum() == 0


def test_tile_legend_adds_a_strip_with_the_swatch_colours():
    image = _photo(40, 120)
    plain = viz.tile("t", image, min_height=10)
    legend = [("cat", (64, 0, 0)), ("dog", (64, 0, 128)), ("a long class name", (0, 128, 0))]
    out = viz.tile("t", image, legend=legend, min_height=10)
    assert out.shape[1] == plain.shape[1] and out.shape[0] > plain.shape[0]
    strip = out[plain.shape[0] :].reshape(-1, 3)
    colours = set(map(tuple, strip))
    assert {(64, 0, 0), (64, 0, 128), (0, 128, 0)} <= colours


def test_panel_pads_tiles_of_different_sizes_without_distortion():
    a = np.full((10, 20, 3), 10, np.uint8)
    b = np.full((30, 5, 3), 20, np.uint8)
    c = np.full((7, 7, 3), 30, np.uint8)
    out = viz.panel([a, b, c], columns=2, background=255, gap=4)
    # columns: max(20, 7) and 5; rows: max(10, 30) and 7
    assert out.shape == (4 + 30 + 4 + 7 + 4, 4 + 20 + 4 + 5 + 4, 3)
    assert np.array_equal(out[4:14, 4:24], a)
    assert np.array_equal(out[4:34, 28:33], b)
    assert np.array_equal(out[38:45, 4:11], c)
    assert (out == 255).sum() == out.size - 3 * (a.size // 3 + b.size // 3 + c.size // 3)


def test_save_png_round_trips(tmp_path):
    image = _photo()
    path = tmp_path / "sub" / "panel.png"
    viz.save_png(path, image)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)
    with pytest.raises(ValueError):
        viz.save_png(tmp_path / "bad.png", image[..., 0])


def test_write_gallery_lists_every_id_and_escapes_text(tmp_path):
    rows = [
        {"id": "2007_000032", "panel": "panels/2007_000032.png", "note": "mIoU 0.42 vs GT"},
        {"id": "<script>alert(1)</script>", "panel": "panels/<script>.png"},
        {"id": "a&b \"q\"", "panel": "panels/a b#1.png", "note": "<b>bold</b>"},
    ]
    metrics = {"make-cam": {"mIoU": 0.4213, "<th>": "x"}, "irn-labels": {"mIoU": 0.5}}
    path = tmp_path / "index.html"
    viz.write_gallery(path, "run <demo>", metrics, rows)
    text = path.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>bold</b>" not in text and "<th>x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a&amp;b &quot;q&quot;" in text
    assert "2007_000032" in text and "mIoU 0.42 vs GT" in text
    assert "run &lt;demo&gt;" in text
    assert "0.4213" in text and "make-cam" in text and "irn-labels" in text
    assert 'src="panels/2007_000032.png"' in text
    assert 'src="panels/a%20b%231.png"' in text  # '#' would otherwise start a fragment
    assert text.count('loading="lazy"') == 3
    assert re.search(r"<style>.*max-width", text, re.S)


def test_write_gallery_rejects_rows_without_a_panel(tmp_path):
    with pytest.raises(ValueError, match="panel"):
        viz.write_gallery(tmp_path / "index.html", "t", {}, [{"id": "x"}])
