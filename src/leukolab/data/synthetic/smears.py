"""Synthetic smear fields with boxes: overlapping red cells, 0-3 white cells of known type, platelets.

A field is composed in optical density like the crops (see
:mod:`leukolab.data.synthetic.raster`): a plasma background with slow
variation; red cells of varied size, shape and central pallor that overlap
each other (their absorbance adds up); platelets (a pale hyalomere around a
dark granular centre); and white cells drawn by the crop renderer
(:func:`leukolab.data.synthetic.cells.cell_layer`), so each one's type is known.
The finishing step adds stain, illumination and colour variation, blur and
noise, all growing with ``difficulty``.

Boxes are the tight pixel-edge extent (``x1, y1, x2, y2``) of each cell's
coverage, clipped to the field. A red cell is annotated when at least 40 % of
it lies in the field and at most 40 % of it is hidden under a white cell
(what an annotator would still box); cells mostly outside the field or hidden
are drawn but not annotated.

:func:`make_smears` writes a folder readable as VOC, COCO and YOLO at once.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from leukolab.data.detection.formats import Annotation, coco_json, voc_xml, yolo_lines, yolo_yaml
from leukolab.data.synthetic.cells import BG, RBC, RBC_PALLOR, WBC_CLASSES, cell_layer, rbc_sprite
from leukolab.data.synthetic.checks import check_count, check_fraction, check_positive, check_seed, check_size
from leukolab.data.synthetic.raster import F32, alpha, fine_noise, finish, fourier_field, to_od
from leukolab.data.synthetic.writers import progress_bar
from leukolab.utils.files import atomic_folder

SMEAR_CLASSES: tuple[str, ...] = ("wbc", "rbc", "platelets")
"""Box classes of a smear field (normalised names)."""
BCCD_NAMES: dict[str, str] = {"wbc": "WBC", "rbc": "RBC", "platelets": "Platelets"}
"""How the written annotations spell the classes (as BCCD does)."""

_SMEAR_STREAM = 2000  # second entropy word of smear fields (crops use 0..4, pools 1000)
_RBC_RADIUS = 46.0  # mean red-cell radius in pixels at scale 1 (BCCD: ~50 at 640 x 480)
_CROP_RBC_RADIUS = 0.34  # red-cell radius in half-crop units in the crop renderer
_PLT_LIGHT = np.array([0.84, 0.74, 0.90])  # pale lilac hyalomere
_PLT_DARK = np.array([0.42, 0.27, 0.58])  # purple granulomere
_WBC_COUNTS = (0.15, 0.45, 0.28, 0.12)  # P(0..3 white cells in a field)


@dataclass(frozen=True)
class SmearBox:
    """One annotated cell of a field: class, pixel-edge box and, for white cells, the type."""

    label: str  # one of SMEAR_CLASSES
    x1: int
    y1: int
    x2: int
    y2: int
    wbc_type: str = ""  # one of WBC_CLASSES for white cells, else ""


def _extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` pixel edges of the true pixels (None when there are none)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _window(h: int, w: int, top: int, left: int, ph: int, pw: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of a ``ph x pw`` patch at ``(top, left)`` and of the field it overlaps (may be empty)."""
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(h, top + ph), min(w, left + pw)
    field = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
    patch = (slice(r0 - top, max(r0, r1) - top), slice(c0 - left, max(c0, c1) - left))
    return field, patch


Box = tuple[int, int, int, int]


def _visible(mask: np.ndarray, h: int, w: int, top: int, left: int) -> tuple[float, Box | None]:
    """Share of ``mask`` inside the field and the field box of that part."""
    total = int(mask.sum())
    field, patch = _window(h, w, top, left, *mask.shape)
    inside = mask[patch]
    box = _extent(inside)
    if box is None or total == 0:
        return 0.0, None
    x1, y1, x2, y2 = box
    dx, dy = field[1].start, field[0].start
    return float(inside.sum()) / total, (x1 + dx, y1 + dy, x2 + dx, y2 + dy)


def _platelet(rng: np.random.Generator, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Optical density (P, P, 3) and coverage (P, P) of one platelet of radius ``r`` pixels."""
    half = math.ceil(1.6 * r) + 2
    p = 2 * half + 1
    c = np.arange(p, dtype=F32) - F32(half)
    x, y = np.meshgrid(c, c)
    t = rng.uniform(0.0, np.pi)
    e = rng.uniform(0.0, 0.35)
    u = (x * math.cos(t) + y * math.sin(t)) * (1.0 - e / 2)
    v = (y * math.cos(t) - x * math.sin(t)) * (1.0 + e / 2)
    rho = np.hypot(u, v)
    wobble = fourier_field(rng, p, 3, 4.0) * F32(0.18 * r)
    cover = alpha(F32(r) + wobble - rho, 1.0)
    centre = np.exp(-((rho / (0.55 * r)) ** 2)) * np.clip(1.0 + 0.6 * fine_noise(rng, p, 0.6), 0.0, 2.0)
    centre *= cover * F32(rng.uniform(0.5, 1.0))
    od = cover[..., None] * to_od(_PLT_LIGHT).astype(F32) + centre[..., None] * (
        to_od(_PLT_DARK) - to_od(_PLT_LIGHT)
    ).astype(F32)
    return od.astype(F32), cover


def render_smear(
    width: int, height: int, rng: np.random.Generator, difficulty: float = 0.5, scale: float = 1.0
) -> tuple[np.ndarray, list[SmearBox]]:
    """Render one smear field and its boxes.

    Args:
        width, height: field size in pixels (>= 32 each).
        rng: the random generator that decides everything about the field.
        difficulty: 0 (clean, sparse, even staining) to 1 (crowded red cells
            that tuck under white cells, strong stain / blur / noise variation,
            white-cell types that look alike).
        scale: cell size multiplier (1: red cells ~92 px across, white cells
            ~140-220 px); use < 1 for small test fields.

    Returns:
        ``(image, boxes)``: an ``(height, width, 3)`` uint8 RGB image and its
        boxes (white cells first, then red cells, then platelets).
    """
    width = check_size(width, "width", 32)
    height = check_size(height, "height", 32)
    d = check_fraction("difficulty", difficulty)
    scale = check_positive("scale", scale, 4.0)
    h, w = height, width
    zoom = scale * float(np.clip(math.exp(rng.normal(0.0, 0.05 + 0.1 * d)), 0.75, 1.3))
    r_rbc = _RBC_RADIUS * zoom

    od = np.empty((h, w, 3), dtype=F32)
    od[:] = to_od(BG).astype(F32)
    od *= (1.0 + (0.08 + 0.15 * d) * fourier_field(rng, h, 4, 2.5, w))[..., None]

    # --- white cells: rendered first so that red cells and platelets can avoid them --------------
    crop = max(16, round(2.0 * r_rbc / _CROP_RBC_RADIUS))
    wbcs: list[tuple[str, np.ndarray, np.ndarray, int, int]] = []  # type, od, coverage, top, left
    wbc_mask = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.choice(len(_WBC_COUNTS), p=_WBC_COUNTS))):
        kind = WBC_CLASSES[int(rng.integers(len(WBC_CLASSES)))]
        layer, cover = cell_layer(kind, crop, rng, d, backdrop=False)
        mask = cover >= 0.5
        for _try in range(20):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            top, left = round(cy) - crop // 2, round(cx) - crop // 2
            share, _ = _visible(mask, h, w, top, left)
            field, patch = _window(h, w, top, left, crop, crop)
            if share >= 0.35 and not (wbc_mask[field] & mask[patch]).any():
                wbc_mask[field] |= mask[patch]
                wbcs.append((kind, layer, cover, top, left))
                break

    # --- red cells: overlapping discs of varied size and pallor ----------------------------------
    coverage = rng.uniform(0.3, 0.55) + 0.25 * d
    n_rbc = round(coverage * h * w / (math.pi * r_rbc**2))
    min_gap = 0.8 - 0.25 * d  # centre distance / sum of radii below which two red cells are too close
    tuck = 0.15 + 0.4 * d  # how deeply a red cell may tuck under a white cell
    amount = np.zeros((h, w), dtype=F32)
    pallor = np.zeros((h, w), dtype=F32)
    centres: list[tuple[float, float, float]] = []
    rbc_boxes: list[SmearBox] = []
    for _ in range(6 * n_rbc):
        if len(centres) >= n_rbc:
            break
        r = r_rbc * rng.uniform(0.8, 1.2)
        cx, cy = rng.uniform(-0.5 * r, w + 0.5 * r), rng.uniform(-0.5 * r, h + 0.5 * r)
        if any(math.hypot(cx - x, cy - y) < min_gap * (r + rr) for x, y, rr in centres):
            continue
        e, t, strength, pal = rng.random(4)
        a, p = rbc_sprite(round(r * 4) / 4, round(e * 3) * 0.05, round(t * 6) * np.pi / 6)
        half = a.shape[0] // 2
        top, left = round(cy) - half, round(cx) - half
        field, patch = _window(h, w, top, left, *a.shape)
        mask = a >= 0.5
        hidden = float((wbc_mask[field] & mask[patch]).sum()) / max(1, int(mask.sum()))
        if hidden > tuck:
            continue
        centres.append((cx, cy, r))
        amount[field] += a[patch] * F32(0.85 + 0.3 * strength)
        pallor[field] += p[patch] * F32((0.85 + 0.3 * strength) * (0.2 + 1.0 * pal))  # varied central pallor
        share, box = _visible(mask, h, w, top, left)
        if box is not None and share >= 0.4 and hidden <= 0.4:
            rbc_boxes.append(SmearBox("rbc", *box))
    od += amount[..., None] * to_od(RBC).astype(F32)
    od += pallor[..., None] * (to_od(RBC_PALLOR) - to_od(RBC)).astype(F32)

    # --- platelets: small, lying on the plasma or on red cells, never under white cells ---------
    plt_boxes: list[SmearBox] = []
    for _ in range(min(8, int(rng.poisson(1.0 + 2.0 * d)))):
        p_od, cover = _platelet(rng, r_rbc * rng.uniform(0.12, 0.22))
        mask = cover >= 0.5
        top, left = round(rng.uniform(0, h)) - p_od.shape[0] // 2, round(rng.uniform(0, w)) - p_od.shape[1] // 2
        field, patch = _window(h, w, top, left, *mask.shape)
        if (wbc_mask[field] & mask[patch]).any():
            continue
        od[field] += p_od[patch]
        share, box = _visible(mask, h, w, top, left)
        if box is not None and share >= 0.5:
            plt_boxes.append(SmearBox("platelets", *box))

    # --- white cells on top --------------------------------------------------------------------
    wbc_boxes: list[SmearBox] = []
    for kind, layer, cover, top, left in wbcs:
        field, patch = _window(h, w, top, left, *cover.shape)
        od[field] *= (1.0 - 0.8 * cover[patch])[..., None]
        od[field] += layer[patch]
        _, box = _visible(cover >= 0.5, h, w, top, left)
        if box is not None:
            wbc_boxes.append(SmearBox("wbc", *box, wbc_type=kind))

    img = finish(od, rng, d, r_rbc / (_CROP_RBC_RADIUS * 32.0))
    return img, wbc_boxes + rbc_boxes + plt_boxes


def make_smears(
    out: Path | str,
    n: int,
    width: int = 640,
    height: int = 480,
    seed: int = 0,
    difficulty: float = 0.5,
    scale: float = 1.0,
    progress: bool = True,
) -> Path:
    """Write ``n`` synthetic smear fields with their boxes in VOC, COCO and YOLO form.

    Layout (readable by :func:`leukolab.data.detection.read_detection` with any
    of the three formats; class names spelled as BCCD does)::

        out/images/smear_00000.jpg      RGB field (JPEG, quality 92)
        out/Annotations/smear_00000.xml Pascal VOC boxes
        out/annotations.json            COCO ground truth (file names relative to images/)
        out/labels/smear_00000.txt      YOLO boxes; class list in classes.txt and data.yaml
        out/boxes.csv                   image,label,x1,y1,x2,y2,wbc_type (one row per box)

    Field ``i`` is drawn from ``np.random.default_rng([seed, 2000, i])``, so the
    same arguments give byte-identical files and a larger ``n`` leaves the
    first fields unchanged.

    Raises:
        LeukolabError: a bad argument or an existing non-empty ``out``.
    """
    n = check_count("n", n)
    width = check_size(width, "width", 32)
    height = check_size(height, "height", 32)
    seed = check_seed(seed)
    difficulty = check_fraction("difficulty", difficulty)
    scale = check_positive("scale", scale, 4.0)
    digits = max(5, len(str(n - 1)))
    classes = [BCCD_NAMES[c] for c in SMEAR_CLASSES]

    def fill(root: Path) -> None:
        for sub in ("images", "Annotations", "labels"):
            (root / sub).mkdir()
        items: list[Annotation] = []
        rows: list[tuple] = []
        for i in progress_bar(range(n), n, "synthetic smears", progress):
            img, boxes = render_smear(width, height, np.random.default_rng([seed, _SMEAR_STREAM, i]), difficulty, scale)
            name = f"smear_{i:0{digits}d}"
            path = root / "images" / f"{name}.jpg"
            Image.fromarray(img).save(path, format="JPEG", quality=92)
            coords = np.array([(b.x1, b.y1, b.x2, b.y2) for b in boxes], dtype=np.float64).reshape(-1, 4)
            item = Annotation(path, width, height, coords, [BCCD_NAMES[b.label] for b in boxes])
            items.append(item)
            (root / "Annotations" / f"{name}.xml").write_text(voc_xml(item), encoding="utf-8")
            (root / "labels" / f"{name}.txt").write_text(yolo_lines(item, classes), encoding="utf-8")
            rows += [(path.name, BCCD_NAMES[b.label], b.x1, b.y1, b.x2, b.y2, b.wbc_type) for b in boxes]
        doc = coco_json(items, classes, root / "images")
        (root / "annotations.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
        (root / "data.yaml").write_text(yolo_yaml(classes), encoding="utf-8")
        with open(root / "boxes.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("image", "label", "x1", "y1", "x2", "y2", "wbc_type"))
            writer.writerows(rows)

    return atomic_folder(out, fill)
