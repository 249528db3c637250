"""Synthetic dense-prediction scenes with exact labels, composed from packaged real images (the dense suite's NYUv2).

A scene is a textured background plane (a real fabric texture, tilted like a floor receding upwards) with 2-4
objects in front of it. Each object is a real silhouette (Fashion-MNIST clothing, Animal-MNIST animals) cut out of
its image, placed on a tilted plane with a dome-shaped bulge, and painted with its own image as albedo. Every pixel
is then shaded (Lambert, one fixed light) and fogged by its depth, so depth and orientation are visible in the image.

Labels come from the same geometry, so they are exact:
- segmentation: the class of the nearest surface (background or one of the object classes), per pixel;
- depth: z of the nearest surface (scene units, about 1.5 to 9);
- surface normals: unit vectors n ∝ (-∂z/∂x, -∂z/∂y, 1) of the nearest surface, x and y the image coordinates in
  [0, 1] (so +z points towards the camera), computed from the analytic surface gradients, not finite differences.

Scenes are a pure function of (seed, split, index) and the source images; train scenes use even-numbered
silhouettes and textures, evaluation scenes odd-numbered ones, so test scenes hold unseen object instances.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from symerge.atomic import atomic_file

SIZE = 64
SEG_CLASSES = ["background", "clothing", "footwear", "bag", "animal"]
FASHION_TO_SEG = {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 6: 1, 5: 2, 7: 2, 9: 2, 8: 3}
"""Fashion-MNIST class -> scene class (tops, trousers, dresses, coats, shirts -> clothing; sandal, sneaker,
ankle boot -> footwear; bag -> bag). Animal-MNIST silhouettes are all `animal`."""
LIGHT = np.array([-0.45, -0.55, 0.70]) / np.linalg.norm([-0.45, -0.55, 0.70])
FOG_RATE = 0.07
CACHE_VERSION = 1


@dataclass(frozen=True)
class SceneSources:
    """Cut-out objects and background textures the scenes are composed from."""

    object_albedo: np.ndarray  # float32 [N, S, S] in [0, 1], the object's own image (grayscale)
    object_mask: np.ndarray  # bool [N, S, S], the silhouette
    object_class: np.ndarray  # int64 [N], index into SEG_CLASSES (never 0)
    textures: np.ndarray  # float32 [T, S, S, 3] in [0, 1]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for array in (self.object_albedo, self.object_mask, self.object_class, self.textures):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Scenes:
    images: np.ndarray  # uint8 [N, SIZE, SIZE, 3]
    segmentation: np.ndarray  # int64 [N, SIZE, SIZE]
    depth: np.ndarray  # float32 [N, SIZE, SIZE]
    normals: np.ndarray  # float32 [N, SIZE, SIZE, 3], unit length

    def __len__(self) -> int:
        return int(len(self.images))


# --------------------------------------------------------------------------- sources


def silhouette_mask(gray: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Foreground of a single-object image: pixels far from the border colour (works for either polarity)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    return np.abs(gray - background) > threshold


def albedo_from(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The object's own intensities inside its mask, lifted so dark objects stay visible on dark scenes."""
    return np.where(mask, 0.35 + 0.65 * gray, 0.0).astype(np.float32)


def build_sources(objects: list[tuple[np.ndarray, int]], textures: np.ndarray) -> SceneSources:
    """`objects`: (uint8 RGB image, scene class) pairs; `textures`: uint8 [T, H, W, 3]. Drops empty silhouettes."""
    albedos, masks, classes = [], [], []
    for image, cls in objects:
        gray = image.astype(np.float32).mean(axis=-1) / 255.0
        mask = silhouette_mask(gray)
        if mask.mean() < 0.05:
            continue
        albedos.append(albedo_from(gray, mask))
        masks.append(mask)
        classes.append(cls)
    return SceneSources(np.stack(albedos), np.stack(masks), np.asarray(classes, dtype=np.int64),
                        textures.astype(np.float32) / 255.0)


def load_default_sources(per_class: int = 300) -> SceneSources:
    """Objects from Fashion-MNIST (Debian) and Animal-MNIST (PyPI), textures from the fabric images of the
    conformal-clip-data wheel (its `nominal` class): the same packages the vision suite reads."""
    from symerge.data.image_tasks import load_image_task

    fashion, animal, textile = (load_image_task(n) for n in ("fashion_mnist", "animal_mnist", "textile_defect"))
    objects: list[tuple[np.ndarray, int]] = []
    counts: dict[int, int] = {}
    for image, label in zip(fashion.images, fashion.labels.tolist()):
        cls = FASHION_TO_SEG[int(label)]
        if counts.get(cls, 0) < per_class:
            objects.append((image, cls))
            counts[cls] = counts.get(cls, 0) + 1
    objects += [(image, SEG_CLASSES.index("animal")) for image in animal.images[:per_class]]
    textures = textile.images[textile.labels == textile.class_names.index("nominal")]
    return build_sources(objects, textures)


# --------------------------------------------------------------------------- geometry


def pixel_grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates of pixel centres in [0, 1]: x (columns) and y (rows), each [size, size]."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(coords, coords)


def unit_normals(dz_dx: np.ndarray, dz_dy: np.ndarray) -> np.ndarray:
    """n ∝ (-∂z/∂x, -∂z/∂y, 1), normalised: [..., 3]."""
    n = np.stack([-dz_dx, -dz_dy, np.ones_like(dz_dx)], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def dome_surface(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], radius: float, base: float,
                 tilt: tuple[float, float], bulge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z = base + a(x-cx) + b(y-cy) - h·sqrt(1 - ρ²) (ρ = distance / radius, clipped at 0.97): a tilted plane with a
    bulge towards the camera. Returns z and its analytic gradients ∂z/∂x, ∂z/∂y."""
    dx, dy = x - centre[0], y - centre[1]
    rho2 = np.minimum((dx**2 + dy**2) / radius**2, 0.97**2)
    root = np.sqrt(1.0 - rho2)
    inside = (dx**2 + dy**2) / radius**2 < 0.97**2
    z = base + tilt[0] * dx + tilt[1] * dy - bulge * root
    grad_scale = np.where(inside, bulge / (radius**2 * root), 0.0)
    return z, tilt[0] + grad_scale * dx, tilt[1] + grad_scale * dy


def sample_texture(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup with wrap-around of an [H, W, 3] texture at texture coordinates (u, v) in tiles."""
    from scipy.ndimage import map_coordinates

    h, w = texture.shape[:2]
    rows, cols = (v * h) % h, (u * w) % w
    return np.stack([map_coordinates(texture[..., c], [rows, cols], order=1, mode="grid-wrap")
                     for c in range(3)], axis=-1)


def place_object(albedo: np.ndarray, mask: np.ndarray, size_px: int, top: int, left: int,
                 out: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The object's albedo and mask resized to `size_px` and pasted at (top, left) on an `out`-sized canvas."""
    from PIL import Image

    a = np.asarray(Image.fromarray(albedo).resize((size_px, size_px), Image.BILINEAR), dtype=np.float32)
    m = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((size_px, size_px), Image.BILINEAR)) > 0.5
    canvas_a = np.zeros((out, out), np.float32)
    canvas_m = np.zeros((out, out), bool)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + size_px, out), min(left + size_px, out)
    canvas_a[r0:r1, c0:c1] = a[r0 - top : r1 - top, c0 - left : c1 - left]
    canvas_m[r0:r1, c0:c1] = m[r0 - top : r1 - top, c0 - left : c1 - left]
    return canvas_a, canvas_m


def compose_scene(rng: np.random.Generator, sources: SceneSources, object_pool: np.ndarray,
                  texture_pool: np.ndarray, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (uint8 image [S, S, 3], int64 segmentation, float32 depth, float32 normals [S, S, 3])."""
    x, y = pixel_grid(size)
    # Background plane: far at the top (a floor receding upwards), a little sideways tilt.
    base = rng.uniform(5.0, 7.0)
    gx, gy = rng.uniform(-1.5, 1.5), rng.uniform(-4.0, -1.5)
    depth = base + gx * (x - 0.5) + gy * (y - 0.5)
    normals = unit_normals(np.full_like(x, gx), np.full_like(y, gy))
    seg = np.zeros((size, size), np.int64)
    texture = sources.textures[rng.choice(texture_pool)]
    tint = rng.uniform(0.55, 1.0, size=3)
    scale, offset = rng.uniform(0.18, 0.3), rng.uniform(0, 1, size=2)
    albedo = sample_texture(texture, (x - 0.5) * depth * scale + offset[0], (y - 0.5) * depth * scale + offset[1]) * tint
    # Objects, each in front of the background at its centre; the nearest surface wins per pixel (z-buffer).
    for _ in range(int(rng.integers(2, 5))):
        index = int(rng.choice(object_pool))
        size_px = int(rng.integers(20, 37))
        top, left = (int(rng.integers(-size_px // 4, size - 3 * size_px // 4)) for _ in range(2))
        obj_albedo, obj_mask = place_object(sources.object_albedo[index], sources.object_mask[index], size_px, top, left, size)
        if not obj_mask.any():
            continue
        centre = ((left + size_px / 2) / size, (top + size_px / 2) / size)
        behind = base + gx * (centre[0] - 0.5) + gy * (centre[1] - 0.5)
        z, zx, zy = dome_surface(x, y, centre, radius=0.6 * size_px / size, base=rng.uniform(1.8, max(2.0, behind - 0.8)),
                                 tilt=(rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)), bulge=rng.uniform(0.0, 0.35))
        nearer = obj_mask & (z < depth)
        depth = np.where(nearer, z, depth)
        normals = np.where(nearer[..., None], unit_normals(zx, zy), normals)
        seg = np.where(nearer, sources.object_class[index], seg)
        colour = rng.uniform(0.3, 1.0, size=3)
        albedo = np.where(nearer[..., None], obj_albedo[..., None] * colour, albedo)
    shading = 0.25 + 0.75 * np.clip(normals @ LIGHT, 0.0, None)
    fog = np.exp(-FOG_RATE * depth)[..., None]
    image = albedo * shading[..., None] * fog + 0.6 * (1.0 - fog)
    return ((np.clip(image, 0, 1) * 255).round().astype(np.uint8), seg, depth.astype(np.float32),
            normals.astype(np.float32))


def generate_scenes(sources: SceneSources, n: int, seed: int, split: str, size: int = SIZE) -> Scenes:
    """`n` scenes of one split: a pure function of (sources, n, seed, split)."""
    parity = 0 if split == "train" else 1
    object_pool = np.arange(parity, len(sources.object_class), 2)
    texture_pool = np.arange(parity, len(sources.textures), 2) if len(sources.textures) > 1 else np.array([0])
    split_key = int(hashlib.sha256(split.encode()).hexdigest()[:8], 16)
    parts = [compose_scene(np.random.default_rng([seed, split_key, i]), sources, object_pool, texture_pool, size)
             for i in range(n)]
    return Scenes(*(np.stack([p[k] for p in parts]) for k in range(4)))


# --------------------------------------------------------------------------- caching


def scenes_cache_path(root: Path, sources: SceneSources, n: int, seed: int, split: str, size: int) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "src": sources.fingerprint(), "n": n, "seed": seed, "split": split,
                      "size": size}, sort_keys=True)
    return root / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def cached_scenes(root: Path, sources: SceneSources, n: int, seed: int, split: str, size: int = SIZE) -> Scenes:
    """`generate_scenes`, cached as .npz under `root` (atomic write; rebuilt when anything in the key changes)."""
    path = scenes_cache_path(root, sources, n, seed, split, size)
    if path.exists():
        try:
            with np.load(path) as data:
                return Scenes(data["images"], data["segmentation"], data["depth"], data["normals"])
        except (OSError, ValueError, KeyError):
            pass
    scenes = generate_scenes(sources, n, seed, split, size)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, images=scenes.images, segmentation=scenes.segmentation, depth=scenes.depth,
                            normals=scenes.normals)
    return scenes
