"""Image-folder data, shared by the image families: unlabeled = a folder of images (searched recursively),
labeled = one subfolder per class name. Images go through the family's image processor in batches of 64."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symerge.errors import FieldError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def check_image_folder(path: Path, labeled: bool) -> str | None:
    if not path.is_dir():
        return f"'{path}' is not a folder (image data: a folder of images" + (", one subfolder per class name)" if labeled else ")")
    return None


def read_images(files: list[Path], processor: Any, field_name: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    batches = []
    for start in range(0, len(files), 64):
        images = []
        for file in files[start:start + 64]:
            try:
                with Image.open(file) as img:
                    images.append(img.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise FieldError(field_name, f"'{file}' is not a readable image ({err})") from None
        batches.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(batches)


def read_image_folder(folder: Path, task: str, processor: Any, class_names: list[str] | None,
                      field_name: str) -> tuple[Tensor, list[int] | None]:
    """Pixel values of every image under `folder` (and, with `class_names`, the label of each from its subfolder)."""
    if class_names is None:
        files = image_files(folder)
        if not files:
            raise FieldError(field_name, f"'{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return read_images(files, processor, field_name), None
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in subdirs if p.name not in class_names]
    if unknown:
        raise FieldError(field_name, f"subfolder '{unknown[0]}' of '{folder}' is not a class name of task "
                         f"'{task}' ({class_names})")
    files, labels = [], []
    for sub in subdirs:
        found = image_files(sub)
        files += found
        labels += [class_names.index(sub.name)] * len(found)
    if not files:
        raise FieldError(field_name, f"'{folder}' holds no images in per-class subfolders")
    return read_images(files, processor, field_name), labels
