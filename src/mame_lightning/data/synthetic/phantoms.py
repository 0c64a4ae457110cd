"""Synthetic mammogram phantoms: the embedded default data when real mammograms are restricted.

A phantom is drawn in display sense (dark background, bright tissue) as it is acquired: the chest
wall on the left edge for a left breast, on the right edge for a right breast. Its attributes are
the ones MAM-E prompts control, drawn so that they stay recoverable after the preparation step
shrinks the image to 64 px: the view (MLO shows the bright pectoral triangle), the density
(share of bright fibroglandular texture) and the breast area (the share of the centre square crop
covered by tissue, tuned by bisection to a ratio well inside its class).

Everything smooth is drawn on a coarse grid and upsampled, so a full-size 3328x2560 phantom takes
a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from mame_lightning.data.records import Box

VIEWS = ("CC", "MLO")
LATERALITIES = ("L", "R")
DENSITIES = ("A", "B", "C", "D")
AREA_CLASSES = ("small", "medium", "big")
LESION_KINDS = ("mass", "calcification", "calcified_mass")
# Finding categories (VinDr-Mammo names) of each lesion kind; a box's own category is the first.
CATEGORY_NAMES = {
    "mass": ("Mass",),
    "calcification": ("Suspicious Calcification",),
    "calcified_mass": ("Mass", "Suspicious Calcification"),
}

# Ratios drawn well inside each class of the (0.4, 0.6) split, so the class survives resizing.
AREA_TARGETS = {"small": (0.25, 0.33), "medium": (0.47, 0.53), "big": (0.68, 0.78)}
# Share of the inner breast (away from skin line and corners) covered by fibroglandular tissue.
DENSE_FRACTION = {"A": 0.05, "B": 0.25, "C": 0.55, "D": 0.85}
# A gentle vendor look (display gamma, noise), enough for the vendor prompt to mean something.
VENDOR_LOOK = {"siemens": (1.0, 0.012), "hologic": (0.85, 0.008), "other": (1.15, 0.016)}

BACKGROUND, FAT, GLAND, MUSCLE, IMPLANT = 0.03, 0.42, 0.7, 0.78, 0.84
SKIN_HALF_WIDTH = 0.03  # half width of the skin-line falloff, in normalised breast radius
COARSE_SHORT_SIDE = 160  # short side of the grid the smooth texture is drawn on


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw; `area` is a class name or a target tissue ratio of the centre square crop."""

    height: int = 256
    width: int = 208
    view: str = "CC"
    laterality: str = "L"
    density: str = "B"
    area: str | float = "medium"
    lesions: tuple[str, ...] = ()
    vendor: str = "siemens"
    implant: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.height < 16 or self.width < 16:
            problems.append(f"size {self.height}x{self.width} is below 16 px")
        if self.view not in VIEWS:
            problems.append(f"view {self.view!r} not in {VIEWS}")
        if self.laterality not in LATERALITIES:
            problems.append(f"laterality {self.laterality!r} not in {LATERALITIES}")
        if self.density not in DENSITIES:
            problems.append(f"density {self.density!r} not in {DENSITIES}")
        if isinstance(self.area, str) and self.area not in AREA_CLASSES:
            problems.append(f"area {self.area!r} not in {AREA_CLASSES}")
        if not isinstance(self.area, str) and not 0.05 <= float(self.area) <= 0.9:
            problems.append(f"area ratio {self.area!r} outside [0.05, 0.9]")
        problems += [f"lesion {k!r} not in {LESION_KINDS}" for k in self.lesions if k not in LESION_KINDS]
        if self.vendor not in VENDOR_LOOK:
            problems.append(f"vendor {self.vendor!r} not in {tuple(VENDOR_LOOK)}")
        if problems:
            raise ValueError("invalid PhantomSpec: " + "; ".join(problems))


@dataclass
class Phantom:
    """A rendered phantom; boxes are in the pixel coordinates of `image` (as acquired)."""

    image: np.ndarray  # float32 HxW in [0, 1], display sense
    tissue: np.ndarray  # bool HxW, the breast silhouette (pectoral included)
    boxes: list[Box] = field(default_factory=list)
    categories: list[tuple[str, ...]] = field(default_factory=list)  # finding categories per box
    area_ratio: float = 0.0  # tissue share of the centre square crop the shape was fitted to


@dataclass(frozen=True)
class _Shape:
    """Breast silhouette for a left breast (chest wall at x = 0), in pixels."""

    cy: float  # ellipse centre row
    a: float  # depth from the chest wall
    b: float  # vertical half axis
    pec_w: float  # pectoral triangle width along the top edge (0 for CC)
    pec_h: float  # pectoral triangle height along the chest wall (0 for CC)

    def scaled(self, s: float) -> "_Shape":
        return _Shape(self.cy, self.a * s, self.b * s, self.pec_w * s, self.pec_h * s)


def target_ratio(area: str | float, rng: np.random.Generator) -> float:
    """A tissue ratio for an area class (drawn inside its safe band) or the ratio itself."""
    if isinstance(area, str):
        low, high = AREA_TARGETS[area]
        return float(rng.uniform(low, high))
    return float(area)


def centre_square(height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the centre square the preparation step keeps."""
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    return y0, y0 + side, x0, x0 + side


def _radii(shape: _Shape, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ellipse radius and pectoral coordinate (< 1 inside) on a broadcast grid."""
    r_ellipse = np.sqrt((xs / shape.a) ** 2 + ((ys - shape.cy) / shape.b) ** 2)
    if shape.pec_w <= 0:
        return r_ellipse, np.full(np.broadcast_shapes(ys.shape, xs.shape), np.inf, np.float32)
    return r_ellipse, xs / shape.pec_w + ys / shape.pec_h


def _crop_ratio(shape: _Shape, height: int, width: int, samples: int = 80) -> float:
    """Share of the centre square covered by the silhouette, on a regular sample grid."""
    y0, y1, x0, x1 = centre_square(height, width)
    ys = (y0 + (np.arange(samples) + 0.5) * (y1 - y0) / samples)[:, None]
    xs = (x0 + (np.arange(samples) + 0.5) * (x1 - x0) / samples)[None, :]
    r_ellipse, pec = _radii(shape, ys, xs)
    return float(np.mean((r_ellipse < 1) | (pec < 1)))


def _base_shape(spec: PhantomSpec, rng: np.random.Generator) -> _Shape:
    """An unscaled silhouette with random proportions; CC keeps its top corner clear."""
    h, w = spec.height, spec.width
    if spec.view == "CC":
        cy = h * rng.uniform(0.48, 0.52)
        return _Shape(cy, w * rng.uniform(0.75, 0.95), h * rng.uniform(0.4, 0.46), 0.0, 0.0)
    cy = h * rng.uniform(0.52, 0.58)
    return _Shape(cy, w * rng.uniform(0.7, 0.85), h * rng.uniform(0.5, 0.56),
                  w * rng.uniform(0.35, 0.45), h * rng.uniform(0.45, 0.6))


def fit_shape(spec: PhantomSpec, ratio: float, rng: np.random.Generator) -> _Shape:
    """Scale a random silhouette by bisection until the centre-crop tissue ratio equals `ratio`.

    A CC silhouette may not grow into its top corner (that corner tells CC from MLO), so it grows
    in depth instead once the height cap is reached.
    """
    base = _base_shape(spec, rng)
    b_cap = 0.47 * spec.height if spec.view == "CC" else np.inf

    def shape_at(s: float) -> _Shape:
        shape = base.scaled(s)
        if shape.b > b_cap:
            extra = shape.b / b_cap
            shape = _Shape(shape.cy, shape.a * extra, b_cap, shape.pec_w, shape.pec_h)
        return shape

    low, high = 0.05, 6.0
    for _ in range(28):
        mid = 0.5 * (low + high)
        if _crop_ratio(shape_at(mid), spec.height, spec.width) < ratio:
            low = mid
        else:
            high = mid
    return shape_at(0.5 * (low + high))


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at edge0 to 1 at edge1 (edges may be reversed for a falling step)."""
    t = (x - np.float32(edge0)) * np.float32(1.0 / (edge1 - edge0))
    np.clip(t, 0.0, 1.0, out=t)
    rise = 3.0 - 2.0 * t
    t *= t
    t *= rise
    return t


def _coarse_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution coordinates of the centres of a coarse grid's cells."""
    step = max(1.0, min(height, width) / COARSE_SHORT_SIDE)
    gh, gw = max(2, round(height / step)), max(2, round(width / step))
    ys = ((np.arange(gh) + 0.5) * height / gh)[:, None]
    xs = ((np.arange(gw) + 0.5) * width / gw)[None, :]
    return ys, xs


def _gland(shape: _Shape, density: str, ys: np.ndarray, xs: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """Fibroglandular amount in [0, 1] on a (coarse) grid: smooth blobs thresholded so their
    share of the breast matches the density, carried by strands converging on the nipple."""
    gh, gw = ys.shape[0], xs.shape[1]
    short = min(gh, gw)
    coarse = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), 0.05 * short, mode="reflect")
    fine = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), 0.02 * short, mode="reflect")
    blobs = 0.8 * coarse / (coarse.std() + 1e-8) + 0.45 * fine / (fine.std() + 1e-8)
    r_ellipse, _ = _radii(shape, ys, xs)
    potential = blobs + 2.0 * (1.0 - np.clip(r_ellipse, 0, 1))  # glands gather behind the nipple
    # No glands right under the skin, nor in the upper and lower corners at the chest wall
    # (where a CC gland blob could pass for a pectoral muscle).
    fade = _smoothstep(0.98, 0.85, np.hypot(xs / shape.a, (ys - shape.cy) / (0.85 * shape.b)))
    inside = fade > 0.5
    share = DENSE_FRACTION[density]
    level = float(np.quantile(potential[inside], 1.0 - share)) if inside.any() else 0.0
    gland = _smoothstep(level - 0.9, level + 0.9, potential)

    # Strands: noise stretched along rays from the nipple, sampled in (angle, distance) space and
    # faded out near the nipple where the rays crowd together.
    angle = np.arctan2(ys - shape.cy, xs - shape.a)
    dist = np.hypot(ys - shape.cy, xs - shape.a) / max(shape.a, 1.0)
    strand_noise = ndimage.gaussian_filter(rng.standard_normal((160, 24)), (1.5, 3.0), mode="wrap")
    strand_noise /= strand_noise.std() + 1e-8
    coords = np.stack([(angle + np.pi) / (2 * np.pi) * 160, np.clip(dist, 0, 1.5) * 15])
    strands = ndimage.map_coordinates(strand_noise, coords, order=1, mode="grid-wrap")
    strands = _smoothstep(-0.3, 1.8, strands) * _smoothstep(0.1, 0.45, dist)
    return np.clip(gland * (0.75 + 0.25 * strands) + 0.15 * strands, 0.0, 1.0) * fade


def _tissue_value(spec: PhantomSpec, shape: _Shape, ys: np.ndarray, xs: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Brightness the breast would have everywhere (before the skin line cuts it off): fat
    thinning towards the skin, glands, and the pectoral muscle and implant where present."""
    r_ellipse, pec = _radii(shape, ys, xs)
    thickness = 0.85 + 0.15 * np.sqrt(np.clip(1.0 - r_ellipse**2, 0.0, 1.0))
    value = FAT * thickness + (GLAND - FAT) * _gland(shape, spec.density, ys, xs, rng)
    if spec.view == "MLO":
        muscle = _smoothstep(1.02, 0.94, pec)
        value += muscle * (MUSCLE * (0.95 + 0.05 * (1 - np.clip(pec, 0, 1))) - value)
    if spec.implant:
        value += _implant_overlay(shape, ys, xs) * (IMPLANT - value)
    return value


def _lerp_index(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower source index and weight of the upper one for each output pixel centre."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.minimum(pos.astype(int), n_in - 2)
    return low, (pos - low).astype(np.float32)


def _upsample(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling, one axis at a time (cheaper than ndimage.zoom at full size)."""
    rows_low, rows_w = _lerp_index(height, coarse.shape[0])
    cols_low, cols_w = _lerp_index(width, coarse.shape[1])
    grid = coarse.astype(np.float32)
    rows = grid[rows_low] * (1 - rows_w)[:, None] + grid[rows_low + 1] * rows_w[:, None]
    return rows[:, cols_low] * (1 - cols_w) + rows[:, cols_low + 1] * cols_w


def _draw_mass(image: np.ndarray, centre: tuple[float, float], radius: float,
               rng: np.random.Generator) -> Box:
    """Add a bright roundish blob with lobulated, spiculated, blurred margin; return its box."""
    h, w = image.shape
    cy, cx = centre
    reach = int(np.ceil(radius * 2.2)) + 2
    y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 1)
    dy = np.arange(y0, y1)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1)[None, :] + 0.5 - cx
    dist, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    edge = np.ones_like(theta)
    for k in (2, 3, 5):  # lobulation
        edge += rng.uniform(0.0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for phi in rng.uniform(-np.pi, np.pi, rng.integers(0, 9)):  # spicules
        gap = np.angle(np.exp(1j * (theta - phi)))
        edge += rng.uniform(0.3, 0.8) * np.exp(-((gap / 0.08) ** 2))
    body = 1.0 - _smoothstep(0.75, 1.05, dist / (radius * edge))
    # Denser than glandular tissue: the mass replaces what lies under it with a brighter core.
    peak = rng.uniform(0.86, 0.95) * (1.0 - 0.15 * np.clip(dist / radius, 0, 1))
    patch = image[y0:y1, x0:x1]
    patch += body * np.maximum(peak - patch, 0.0)
    ys, xs = np.nonzero(body > 0.5)
    if ys.size == 0:  # too small to cover a pixel centre: keep the pixel under the centre
        ys, xs = np.array([int(cy) - y0]), np.array([int(cx) - x0])
    return Box(float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1),
               float(y0 + ys.max() + 1))


def _draw_calcifications(image: np.ndarray, centre: tuple[float, float], spread: float,
                         rng: np.random.Generator) -> Box:
    """Add a cluster of tiny bright dots (each a few pixels at most); return the cluster box."""
    h, w = image.shape
    count = int(rng.integers(6, 18))
    pts = np.asarray(centre) + rng.normal(0, spread / 2, (count, 2))
    pts = np.clip(pts, 0, [h - 1, w - 1]).astype(int)
    dot_sigma = max(0.5, 0.0012 * min(h, w))
    pad = int(np.ceil(3 * dot_sigma)) + 1
    y0, x0 = max(0, pts[:, 0].min() - pad), max(0, pts[:, 1].min() - pad)
    y1, x1 = min(h, pts[:, 0].max() + pad + 1), min(w, pts[:, 1].max() + pad + 1)
    spikes = np.zeros((y1 - y0, x1 - x0), np.float32)
    spikes[pts[:, 0] - y0, pts[:, 1] - x0] = rng.uniform(0.7, 1.0, count)
    dots = ndimage.gaussian_filter(spikes, dot_sigma) * (2 * np.pi * dot_sigma**2)
    image[y0:y1, x0:x1] = np.maximum(image[y0:y1, x0:x1], np.clip(dots, 0, 1) * 0.98)
    box_pad = max(1, int(np.ceil(dot_sigma)))
    return Box(float(max(0, pts[:, 1].min() - box_pad)), float(max(0, pts[:, 0].min() - box_pad)),
               float(min(w, pts[:, 1].max() + box_pad + 1)),
               float(min(h, pts[:, 0].max() + box_pad + 1)))


def _draw_lesion(image: np.ndarray, kind: str, shape: _Shape, rng: np.random.Generator) -> Box:
    """Draw one lesion of `kind` at a random site inside the breast; its box carries the kind's
    first finding category."""
    short = min(image.shape)
    site = _lesion_site(shape, rng)
    if kind == "calcification":
        box = _draw_calcifications(image, site, short * 0.06, rng)
    else:
        radius = short * rng.uniform(0.04, 0.075)
        box = _draw_mass(image, site, radius, rng)
        if kind == "calcified_mass":
            dots = _draw_calcifications(image, site, radius * 0.6, rng)
            box = Box(min(box.x0, dots.x0), min(box.y0, dots.y0), max(box.x1, dots.x1),
                      max(box.y1, dots.y1))
    box.category = CATEGORY_NAMES[kind][0]
    return box


def _implant_overlay(shape: _Shape, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of a silicone implant: a bright smooth oval behind the glands."""
    r = np.sqrt(((xs - 0.38 * shape.a) / (0.3 * shape.a)) ** 2 + ((ys - shape.cy) / (0.4 * shape.b)) ** 2)
    return _smoothstep(1.0, 0.9, r)


def _lesion_site(shape: _Shape, rng: np.random.Generator) -> tuple[float, float]:
    """A point well inside the glandular part of the breast, below any pectoral muscle."""
    for _ in range(200):
        rad, ang = rng.uniform(0.25, 0.65), rng.uniform(-1.0, 1.0)
        y, x = shape.cy + rad * shape.b * np.sin(ang), rad * shape.a * np.cos(ang)
        if shape.pec_w <= 0 or x / shape.pec_w + y / shape.pec_h > 1.3:
            return float(y), float(x)
    return float(shape.cy), float(0.4 * shape.a)


def _mirror(box: Box, width: int) -> Box:
    return Box(width - box.x1, box.y0, width - box.x0, box.y1, box.category)


def render_phantom(spec: PhantomSpec, rng: np.random.Generator) -> Phantom:
    """Draw one phantom; the same spec and generator state give the same pixels."""
    h, w = spec.height, spec.width
    # Independent streams, so adding a lesion leaves every pixel away from it unchanged.
    shape_rng, texture_rng, lesion_rng, noise_rng = rng.spawn(4)
    ratio = target_ratio(spec.area, shape_rng)
    shape = fit_shape(spec, ratio, shape_rng)

    # Everything smooth is drawn on a coarse grid; only the skin line is drawn at full size.
    tissue_value = _upsample(_tissue_value(spec, shape, *_coarse_grid(h, w), texture_rng), h, w)
    ys = np.arange(h, dtype=np.float32)[:, None] + np.float32(0.5)
    xs = np.arange(w, dtype=np.float32)[None, :] + np.float32(0.5)
    r_ellipse, pec = _radii(shape, ys, xs)
    radius = np.minimum(r_ellipse, pec) if spec.view == "MLO" else r_ellipse
    envelope = _smoothstep(1.0 + SKIN_HALF_WIDTH, 1.0 - SKIN_HALF_WIDTH, radius)
    image = tissue_value
    image -= np.float32(BACKGROUND)
    image *= envelope
    image += np.float32(BACKGROUND)

    boxes = [_draw_lesion(image, kind, shape, lesion_rng) for kind in spec.lesions]

    gamma, noise_sigma = VENDOR_LOOK[spec.vendor]
    np.clip(image, 0.0, 1.0, out=image)
    if gamma != 1.0:
        np.power(image, np.float32(gamma), out=image)
    image += noise_rng.standard_normal((h, w), dtype=np.float32) * np.float32(noise_sigma)
    image = np.clip(image, 0.0, 1.0, out=image)
    tissue = radius < 1.0
    if spec.laterality == "R":
        image, tissue = image[:, ::-1].copy(), tissue[:, ::-1].copy()
        boxes = [_mirror(b, w) for b in boxes]
    return Phantom(image, tissue, boxes, [CATEGORY_NAMES[k] for k in spec.lesions], ratio)
