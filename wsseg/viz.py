"""Palettes, overlays and the panels that `wsseg inspect` draws.

Every drawing function is pure: numpy arrays in, an (H, W, 3) uint8 RGB array out.
`save_png` and `write_gallery` are the only functions that touch the disk.
Drawing uses numpy and PIL only; text uses PIL's default font, scaled with FreeType when
the installed Pillow has it. (The run section's plots are matplotlib's: wsseg.plots.)
"""

from __future__ import annotations

import html
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsseg.data.images import VOC_PALETTE, write_rgb_png

# Tiles shorter than this are upscaled (by an integer factor, nearest) so a ~128 px demo
# image is still readable in a browser.
MIN_TILE_HEIGHT = 192
FONT_SIZE = 14  # px; legible at 100 % zoom
TITLE_BACKGROUND = (225, 225, 225)  # light grey strip, black text on it
TEXT_COLOR = (0, 0, 0)
FRAME = 1  # px of grey frame around each tile's image
FRAME_COLOR = (150, 150, 150)
INSTANCE_BACKGROUND = (0, 0, 0)  # colour of id 0 (no instance) in instance_colors
ARROW_SUPERSAMPLE = 4  # displacement_arrows draws this many times larger, then shrinks
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949  # hue step between consecutive instance ids

# Anchors of the heatmap: an inferno-like ramp black -> purple -> red -> orange -> pale
# yellow whose luminance rises strictly, so low and high CAM values never look alike
# (unlike jet, whose yellow and cyan have similar luminance).
_HEATMAP_ANCHORS = np.array(
    [
        [0, 0, 4],
        [87, 16, 110],
        [188, 55, 84],
        [249, 142, 9],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


# ----------------------------------------------------------------------------- colours


def label_colors(labels: np.ndarray) -> np.ndarray:
    """VOC colours of a label map.

    labels: (H, W) integer class ids, 0 background, 1..C classes, 255 void.
    Returns (H, W, 3) uint8; 255 gets the palette's void colour (224, 224, 192).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an (H, W) integer array, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels must lie in 0..255, got {labels.min()}..{labels.max()}")
    return VOC_PALETTE[labels.astype(np.uint8)]


def class_legend(labels: np.ndarray, class_names: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """Legend entries (name, rgb) for the classes present in `labels`, in id order.

    class_names: the foreground names in dataset order (class id i + 1 is class_names[i]);
    id 0 is called "background" and 255 "void". Unknown ids are shown as "class <id>".
    """
    entries: list[tuple[str, tuple[int, int, int]]] = []
    for class_id in np.unique(np.asarray(labels)):
        class_id = int(class_id)
        if class_id == 0:
            name = "background"
        elif class_id == 255:
            name = "void"
        elif class_id - 1 < len(class_names):
            name = class_names[class_id - 1]
        else:
            name = f"class {class_id}"
        entries.append((name, tuple(int(c) for c in VOC_PALETTE[class_id])))
    return entries


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5, mask: np.ndarray | None = None) -> np.ndarray:
    """Blend `colors` over `image`: (1 - alpha) * image + alpha * colors.

    image, colors: (H, W, 3) uint8. mask: optional (H, W) bool; where False the image is
    kept unchanged. Returns (H, W, 3) uint8.
    """
    image = _check_rgb(image, "image")
    colors = _check_rgb(colors, "colors")
    if colors.shape != image.shape:
        raise ValueError(f"colors {colors.shape} must match image {image.shape}")
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colors.astype(np.float64)
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} must match image {image.shape[:2]}")
        blended = np.where(mask[..., None], blended, image)
    return blended


def heatmap(values: np.ndarray) -> np.ndarray:
    """Colour a map of values in [0, 1] (clipped): 0 black, 1 pale yellow.

    Piecewise linear through inferno-like anchors; luminance increases with the value.
    values: (H, W) float. Returns (H, W, 3) uint8.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be (H, W), got {values.shape}")
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_HEATMAP_ANCHORS))
    channels = [np.interp(values, positions, _HEATMAP_ANCHORS[:, c]) for c in range(3)]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A CAM in [0, 1] drawn as a heatmap over the image.

    image: (H, W, 3) uint8. cam: (h, w) float in [0, 1]; resized bilinearly to (H, W)
    when it is smaller (e.g. the stride-4 CAM). Returns (H, W, 3) uint8.
    """
    image = _check_rgb(image, "image")
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be (H, W), got {cam.shape}")
    if cam.shape != image.shape[:2]:
        resized = Image.fromarray(cam, mode="F").resize((image.shape[1], image.shape[0]), Image.BILINEAR)
        cam = np.asarray(resized, dtype=np.float32)
    return overlay(image, heatmap(cam), alpha=alpha)


def instance_colors(ids: np.ndarray) -> np.ndarray:
    """Each instance id a distinct, stable colour; 0 (no instance) is black.

    The hue of id k is frac(k * 0.618...) (golden-ratio steps spread neighbouring ids
    around the wheel), so an instance keeps its colour across images and runs. Pixels
    whose 4-neighbour has another id are drawn darker, so touching instances separate.
    ids: (H, W) integer. Returns (H, W, 3) uint8.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be an (H, W) integer array, got {ids.shape} {ids.dtype}")
    ids = ids.astype(np.int64)
    hue = np.mod(ids.astype(np.float64) * GOLDEN_RATIO_CONJUGATE, 1.0)
    rgb = _hsv_to_rgb(hue, np.full(ids.shape, 0.65), np.full(ids.shape, 0.95))
    rgb[ids == 0] = np.array(INSTANCE_BACKGROUND) / 255.0

    edge = np.zeros(ids.shape, dtype=bool)
    vertical = ids[1:, :] != ids[:-1, :]
    horizontal = ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge &= ids != 0  # darken the instance side only; the background is already dark
    rgb[edge] *= 0.45
    return _to_uint8(rgb)


def displacement_colors(
    disp: np.ndarray, max_magnitude: float | None = None, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """A displacement field on a colour wheel: hue = direction, saturation = magnitude.

    disp: (2, h, w) float, (dy, dx) in stride-4 pixels, dy pointing down the image.
    Zero displacement is white; a vector of length >= max_magnitude is fully saturated.
    Red points right (+dx), chartreuse down, cyan left, violet up; `displacement_wheel`
    draws the key.
    max_magnitude: None uses the field's largest length. shape: (H, W) of the image to
    enlarge to (nearest, so the stride-4 cells stay visible); None keeps (h, w).
    Returns (h, w, 3) uint8, or (H, W, 3) with shape.
    """
    dy, dx = _check_disp(disp)
    magnitude = np.hypot(dy, dx)
    if max_magnitude is None:
        max_magnitude = float(magnitude.max()) if magnitude.size else 0.0
    max_magnitude = max(float(max_magnitude), 1e-6)
    hue = np.mod(np.arctan2(dy, dx) / (2.0 * math.pi), 1.0)
    saturation = np.clip(magnitude / max_magnitude, 0.0, 1.0)
    colors = _to_uint8(_hsv_to_rgb(hue, saturation, np.ones_like(hue)))
    return colors if shape is None else _resize_exact(colors, shape, smooth=False)


def displacement_wheel(size: int = 64) -> np.ndarray:
    """The key to `displacement_colors`: a disc whose colour at each point is that of the
    vector from the centre to that point (white centre, saturated rim), white outside.

    Returns (size, size, 3) uint8.
    """
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    dy, dx = np.meshgrid(coords, coords, indexing="ij")
    radius = (size - 1) / 2.0
    wheel = displacement_colors(np.stack([dy, dx]), max_magnitude=radius)
    wheel[np.hypot(dy, dx) > radius] = 255
    return wheel


def displacement_arrows(
    image: np.ndarray, disp: np.ndarray, step: int = 8, min_magnitude: float = 0.5, min_height: int = MIN_TILE_HEIGHT
) -> np.ndarray:
    """Arrows from sample points to where the displacement field sends them.

    image: (H, W, 3) uint8. disp: (2, h, w) float (dy, dx) in stride-4 pixels, h and w
    covering the image at stride H / h, W / w (about 4). One arrow every `step` image
    pixels, drawn at full length (converted to image pixels), skipped where the length is
    under `min_magnitude` stride-4 pixels (the background, which IRN drives towards 0).
    The image is first upscaled (bilinear, integer factor) to at least `min_height` rows
    so that the arrows are not drawn at the resolution of a thumbnail.
    Returns (k * H, k * W, 3) uint8 with k = max(1, ceil(min_height / H)).
    """
    image = _check_rgb(image, "image")
    dy, dx = _check_disp(disp)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    height, width = image.shape[:2]
    factor = _upscale_factor(height, min_height)
    canvas = resize_to(image, height * factor, smooth=True) if factor > 1 else image.copy()
    stride_y = height / dy.shape[0]  # image pixels per displacement cell (about 4)
    stride_x = width / dy.shape[1]
    arrows: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for y in range(step // 2, height, step):
        for x in range(step // 2, width, step):
            row = min(int(y / stride_y), dy.shape[0] - 1)
            col = min(int(x / stride_x), dy.shape[1] - 1)
            vy, vx = float(dy[row, col]), float(dx[row, col])
            if math.hypot(vy, vx) < min_magnitude:
                continue
            start = (x + 0.5, y + 0.5)  # pixel centre, in image pixels
            arrows.append((start, (start[0] + vx * stride_x, start[1] + vy * stride_y)))
    if not arrows:
        return canvas

    # Draw at SUPERSAMPLE x the size and shrink with a box filter: anti-aliased lines.
    # Nearest-upscaled pixels average back to themselves, so the photo is unchanged.
    scale = factor * ARROW_SUPERSAMPLE
    big = np.repeat(np.repeat(canvas, ARROW_SUPERSAMPLE, axis=0), ARROW_SUPERSAMPLE, axis=1)
    picture = Image.fromarray(big)
    draw = ImageDraw.Draw(picture)
    head = (3.0 + 1.5 * factor) * ARROW_SUPERSAMPLE
    # All dark outlines first, then all bright cores, so no outline hides another arrow.
    for color, width, grow in (((0, 0, 0), 3.5, 1.0 * ARROW_SUPERSAMPLE), ((255, 255, 80), 1.5, 0.0)):
        for start, end in arrows:
            start_big = (start[0] * scale, start[1] * scale)
            end_big = (end[0] * scale, end[1] * scale)
            _arrow(draw, start_big, end_big, color=color, width=round(width * ARROW_SUPERSAMPLE), head=head + grow)
    small = picture.resize((canvas.shape[1], canvas.shape[0]), Image.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def boundary_image(boundary: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A boundary probability map in [0, 1] (clipped) as dark lines on white.

    boundary: (h, w) float (IRN predicts it at stride 4). shape: (H, W) of the image to
    enlarge to (bilinear); None keeps (h, w). Returns (h, w, 3) or (H, W, 3) uint8,
    255 * (1 - boundary) in every channel.
    """
    boundary = np.asarray(boundary, dtype=np.float64)
    if boundary.ndim != 2:
        raise ValueError(f"boundary must be (H, W), got {boundary.shape}")
    grey = np.rint(255.0 * (1.0 - np.clip(np.nan_to_num(boundary, nan=0.0), 0.0, 1.0))).astype(np.uint8)
    if shape is not None:
        grey = _resize_exact(grey, shape, smooth=True)
    return np.repeat(grey[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- layout


def resize_to(image: np.ndarray, height: int, smooth: bool = False) -> np.ndarray:
    """Resize to `height` rows keeping the aspect ratio.

    image: (H, W, 3) or (H, W) uint8. smooth=False uses nearest neighbour (label maps,
    instance ids: no invented colours); smooth=True bilinear (photos). Returns uint8 of
    the same number of channels.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    width = max(1, int(round(image.shape[1] * height / image.shape[0])))
    resample = Image.BILINEAR if smooth else Image.NEAREST
    return np.asarray(Image.fromarray(image).resize((width, height), resample), dtype=np.uint8).copy()


def tile(
    title: str,
    image: np.ndarray,
    legend: list[tuple[str, tuple[int, int, int]]] | None = None,
    min_height: int = MIN_TILE_HEIGHT,
) -> np.ndarray:
    """An image with a title strip above it and an optional legend strip below.

    image: (H, W, 3) uint8 (or (H, W) uint8 grey); upscaled by the smallest integer factor
    (nearest, so labels stay exact) that makes it at least `min_height` rows.
    legend: (name, rgb) swatches, wrapped over as many lines as the width needs.
    The title is black on light grey and shortened with "..." when wider than the image.
    A 1 px grey frame surrounds the image. Returns (title + H' + 2 + legend, W' + 2, 3) uint8.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = _check_rgb(image, "image")
    factor = _upscale_factor(image.shape[0], min_height)
    if factor > 1:
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    # A 1 px grey frame, so white content (boundaries, zero displacement) has an edge.
    framed = np.empty((image.shape[0] + 2 * FRAME, image.shape[1] + 2 * FRAME, 3), dtype=np.uint8)
    framed[:] = FRAME_COLOR
    framed[FRAME:-FRAME, FRAME:-FRAME] = image
    image = framed
    width = image.shape[1]
    font = _font()
    line_height = _line_height()
    padding = 4

    title_strip = Image.new("RGB", (width, line_height + 2 * padding), TITLE_BACKGROUND)
    draw = ImageDraw.Draw(title_strip)
    draw.text((padding, padding), _fit_text(draw, title, width - 2 * padding), fill=TEXT_COLOR, font=font)
    parts = [np.asarray(title_strip, dtype=np.uint8), image]

    if legend:
        parts.append(_legend_strip(legend, width))
    return np.concatenate(parts, axis=0)


def panel(tiles: list[np.ndarray], columns: int = 4, background: int = 255, gap: int = 4) -> np.ndarray:
    """Tiles on a grid, row by row, each at its own size in the top-left of its cell.

    A cell is as wide as the widest tile of its column and as tall as the tallest of its
    row; the rest is `background` (0..255 grey). `gap` px separate cells and frame the
    grid. tiles: (H_i, W_i, 3) uint8. Returns (H, W, 3) uint8.
    """
    if not tiles:
        raise ValueError("panel needs at least one tile")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    tiles = [_check_rgb(t, f"tile {i}") for i, t in enumerate(tiles)]
    num_rows = math.ceil(len(tiles) / columns)
    column_widths = [0] * min(columns, len(tiles))
    row_heights = [0] * num_rows
    for index, t in enumerate(tiles):
        row, column = divmod(index, columns)
        column_widths[column] = max(column_widths[column], t.shape[1])
        row_heights[row] = max(row_heights[row], t.shape[0])
    total_width = sum(column_widths) + gap * (len(column_widths) + 1)
    total_height = sum(row_heights) + gap * (num_rows + 1)
    canvas = np.full((total_height, total_width, 3), background, dtype=np.uint8)
    for index, t in enumerate(tiles):
        row, column = divmod(index, columns)
        top = gap + sum(row_heights[:row]) + gap * row
        left = gap + sum(column_widths[:column]) + gap * column
        canvas[top : top + t.shape[0], left : left + t.shape[1]] = t
    return canvas


# ----------------------------------------------------------------------------- output


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG, creating the parent folder."""
    rgb = _check_rgb(rgb, "rgb")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_rgb_png(path, rgb)


def write_gallery(
    path: str | os.PathLike,
    title: str,
    metrics: dict[str, dict[str, float | str]],
    rows: list[dict],
    figures: Sequence[dict] = (),
) -> None:
    """Write index.html: the title, a metrics table, the run section, then one row per image.

    metrics: stage -> metric name -> value; one table row per stage, one column per metric
    name (blank where a stage lacks it). rows: dicts with "id" (str), "panel" (the panel
    PNG's path relative to the HTML file) and optionally "note" (str, e.g. "mIoU 0.42 vs
    GT"). figures: the run section's pictures, dicts with "title", "image" (path relative to
    the HTML file) and optionally "caption", grouped under one heading per stage (the title's
    part before " — "). All text is HTML-escaped and paths URL-quoted. Plain HTML and CSS:
    opens from disk in any browser.
    """
    for index, row in enumerate(rows):
        missing = [key for key in ("id", "panel") if key not in row]
        if missing:
            raise ValueError(f"gallery row {index} lacks {', '.join(missing)}")

    esc = html.escape
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_GALLERY_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    lines.extend(_metrics_table(metrics))
    lines.extend(_run_section(figures))
    lines.append(f'<p class="count">{len(rows)} image{"" if len(rows) == 1 else "s"}</p>')
    for row in rows:
        image_id = str(row["id"])
        source = esc(quote(Path(row["panel"]).as_posix(), safe="/"))
        lines.append('<section class="row">')
        lines.append(f'<h2 class="id">{esc(image_id)}</h2>')
        if row.get("note"):
            lines.append(f'<p class="note">{esc(str(row["note"]))}</p>')
        lines.append(
            f'<a href="{source}"><img src="{source}" loading="lazy" alt="{esc("panel of " + image_id)}"></a>'
        )
        lines.append("</section>")
    lines.extend(["</body>", "</html>", ""])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def _run_section(figures: Sequence[dict]) -> list[str]:
    """The gallery's run section: the pictures of each stage under its name."""
    if not figures:
        return []
    esc = html.escape
    lines = ['<section class="run">', "<h2>run</h2>"]
    heading = None
    for figure in figures:
        title = str(figure["title"])
        stage = title.split(" — ")[0]
        if stage != heading:
            if heading is not None:
                lines.append("</div>")
            lines.extend([f'<h3 class="stage">{esc(stage)}</h3>', '<div class="figures">'])
            heading = stage
        source = esc(quote(Path(figure["image"]).as_posix(), safe="/"))
        caption = esc(title.split(" — ", 1)[-1]) + (f' <span class="caption">{esc(str(figure["caption"]))}</span>'
                                                     if figure.get("caption") else "")
        lines.append(f'<figure><a href="{source}"><img src="{source}" alt="{esc(title)}"></a>'
                     f"<figcaption>{caption}</figcaption></figure>")
    lines.extend(["</div>", "</section>"])
    return lines


_GALLERY_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 0.6em 0; }
table.metrics { border-collapse: collapse; margin-bottom: 1em; font-size: 0.9em; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
table.metrics th { background: #e8e8e8; }
table.metrics td.stage, table.metrics th.stage { text-align: left; }
p.count, p.empty { color: #555; }
section.row { background: #fff; border: 1px solid #ddd; padding: 0.6em; margin-bottom: 1em; }
h2.id { font-size: 1em; font-family: monospace; margin: 0 0 0.3em 0; }
p.note { margin: 0 0 0.4em 0; color: #333; }
section.run { margin-bottom: 1.5em; }
section.run h2 { font-size: 1.2em; margin: 0.8em 0 0.3em 0; }
h3.stage { font-size: 1em; font-family: monospace; margin: 0.8em 0 0.3em 0; }
div.figures { display: flex; flex-wrap: wrap; gap: 0.6em; }
div.figures figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 0.4em; }
div.figures img { max-width: 900px; display: block; }
figcaption { font-size: 0.85em; color: #333; margin-top: 0.3em; }
span.caption { color: #666; }
section.row img { max-width: 100%; height: auto; display: block; }
"""


def _metrics_table(metrics: dict[str, dict[str, float | str]]) -> list[str]:
    if not metrics:
        return ['<p class="empty">No stage metrics recorded yet.</p>']
    names: list[str] = []
    for values in metrics.values():
        for name in values:
            if name not in names:
                names.append(name)
    esc = html.escape
    lines = ['<table class="metrics">', '<tr><th class="stage">stage</th>']
    lines[-1] += "".join(f"<th>{esc(str(name))}</th>" for name in names) + "</tr>"
    for stage, values in metrics.items():
        cells = "".join(f"<td>{esc(_format_value(values[name])) if name in values else ''}</td>" for name in names)
        lines.append(f'<tr><td class="stage">{esc(str(stage))}</td>{cells}</tr>')
    lines.append("</table>")
    return lines


def _format_value(value: float | str) -> str:
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


# ----------------------------------------------------------------------------- helpers


def _check_rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    return image


def _check_disp(disp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    disp = np.asarray(disp, dtype=np.float64)
    if disp.ndim != 3 or disp.shape[0] != 2:
        raise ValueError(f"disp must be (2, h, w) (dy, dx), got {disp.shape}")
    disp = np.nan_to_num(disp, nan=0.0, posinf=0.0, neginf=0.0)
    return disp[0], disp[1]


def _to_uint8(rgb01: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb01 * 255.0), 0, 255).astype(np.uint8)


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] to RGB floats in [0, 1], (..., 3); the standard six-sector formula."""
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.astype(np.int64) % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    choices_r = [value, q, p, p, t, value]
    choices_g = [t, value, value, q, p, p]
    choices_b = [p, p, t, value, value, q]
    red = np.choose(sector, choices_r)
    green = np.choose(sector, choices_g)
    blue = np.choose(sector, choices_b)
    return np.stack([red, green, blue], axis=-1).astype(np.float64)


def _resize_exact(image: np.ndarray, shape: tuple[int, int], smooth: bool) -> np.ndarray:
    """(h, w[, 3]) uint8 resized to exactly shape = (H, W)."""
    height, width = int(shape[0]), int(shape[1])
    if image.shape[:2] == (height, width):
        return image
    resample = Image.BILINEAR if smooth else Image.NEAREST
    return np.asarray(Image.fromarray(image).resize((width, height), resample), dtype=np.uint8).copy()


def _upscale_factor(height: int, min_height: int) -> int:
    return max(1, math.ceil(min_height / max(height, 1)))


def _arrow(
    draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], color, width: int, head: float
) -> None:
    draw.line([start, end], fill=color, width=width)
    length = math.hypot(end[0] - start[0], end[1] - start[1])
    if length < 1e-6:
        return
    ux, uy = (end[0] - start[0]) / length, (end[1] - start[1]) / length
    head = min(head, 0.6 * length + 2)  # short arrows keep a visible but smaller head
    back = (end[0] - ux * head, end[1] - uy * head)
    left = (back[0] - uy * head * 0.6, back[1] + ux * head * 0.6)
    right = (back[0] + uy * head * 0.6, back[1] - ux * head * 0.6)
    draw.polygon([end, left, right], fill=color)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # scalable default font (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # the small bitmap font


@lru_cache(maxsize=1)
def _line_height() -> int:
    left, top, right, bottom = _font().getbbox("Ag|jy")
    return int(bottom) + 2


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=_font())
    return int(right - left)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, shortened with "..." so that it fits in `width` px."""
    if _text_width(draw, text) <= width:
        return text
    while text and _text_width(draw, text + "...") > width:
        text = text[:-1]
    return text + "..."


def _legend_strip(legend: list[tuple[str, tuple[int, int, int]]], width: int) -> np.ndarray:
    """Swatch + name entries left to right, wrapping onto new lines; white background."""
    font = _font()
    line_height = _line_height()
    padding, swatch, spacing = 4, line_height - 2, 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placements: list[tuple[int, int, str, tuple[int, int, int]]] = []
    x, line = padding, 0
    for name, color in legend:
        name = _fit_text(measure, str(name), max(width - 2 * padding - swatch - 4, 8))
        entry_width = swatch + 4 + _text_width(measure, name)
        if x > padding and x + entry_width > width - padding:
            x, line = padding, line + 1
        placements.append((x, line, name, tuple(int(c) for c in color)))
        x += entry_width + spacing
    strip = Image.new("RGB", (width, (line + 1) * (line_height + padding) + padding), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, line, name, color in placements:
        top = padding + line * (line_height + padding)
        draw.rectangle([x, top + 1, x + swatch - 1, top + swatch], fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + 4, top), name, fill=TEXT_COLOR, font=font)
    return np.asarray(strip, dtype=np.uint8)
