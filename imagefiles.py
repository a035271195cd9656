"""Which files of a folder are images: the extensions read, and the sorted listing every script uses."""

import os
from pathlib import Path

from errors import CaptchaError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def list_images(folder):
    """Image files under `folder` (sub-folders too, linked ones included), sorted so every run sees the same order."""
    folder = Path(folder)
    if not folder.exists():
        raise CaptchaError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise CaptchaError(f"{folder}: not a folder")
    found, visited = [], set()
    for root, subfolders, files in os.walk(folder, followlinks=True):  # rglob skips linked sub-folders
        real = os.path.realpath(root)
        if real in visited:  # a link back up the tree, or a second link to one folder: listed once
            subfolders[:] = []
            continue
        visited.add(real)
        found += [Path(root) / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())
