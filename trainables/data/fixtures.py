"""Tiny copies of the real on-disk layouts (CelebA, Waterbirds, image CSV, time-series arrays).

Nothing is downloaded at run time, so the tests, the loading benchmark and anyone trying an adapter
without the real data write these instead. Each writer returns the ``dataset.options`` that read
what it wrote. Rows cycle through every combination of label and attributes in blocks, and each
block goes to one partition, so every (label, group) cell is in every split; the pictures carry
their label (a bright square, top or bottom) and group (the tint), so a model can learn them.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = ["write_celeba", "write_waterbirds", "write_image_csv", "write_timeseries_arrays", "picture"]

CELEBA_ATTRIBUTES = ("Blond_Hair", "Male", "Young", "Wearing_Hat")
_BLOCK_PARTITIONS = (0, 0, 0, 1, 2)  # blocks of rows: train, train, train, val, test, repeat


def picture(label: int, group: int, rng: np.random.Generator, size: tuple[int, int] = (24, 20)) -> np.ndarray:
    """uint8 (H, W, 3): noise, a bright square in the top (label 1) or bottom half, a group tint."""
    w, h = size
    img = rng.integers(0, 90, size=(h, w, 3)).astype(np.int64)
    img[..., group % 3] += 60 + 40 * (group // 3)
    top = 1 if label else h // 2 + 1
    img[top:top + h // 3, w // 4:w // 4 + w // 3] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image  # Pillow only when image files are written

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _combos(n: int, sizes: Sequence[int]) -> np.ndarray:
    """Row i gets combination i mod prod(sizes), so every block of prod(sizes) rows holds them all."""
    table = np.array(list(itertools.product(*[range(s) for s in sizes])), dtype=np.int64)
    return table[np.arange(n) % len(table)]


def _partitions(n: int, block: int) -> np.ndarray:
    return np.array([_BLOCK_PARTITIONS[(i // block) % len(_BLOCK_PARTITIONS)] for i in range(n)], dtype=np.int64)


def write_celeba(root: Path, n: int = 160, seed: int = 0, kaggle_csv: bool = False,
                 attributes: Sequence[str] = CELEBA_ATTRIBUTES) -> dict[str, Any]:
    """ROOT/img_align_celeba/*.jpg, list_attr_celeba.txt (-1/1), list_eval_partition.txt (0/1/2). The pictures
    carry the first two ``attributes`` (label, group); every split holds every combination when n is at least
    5 * 2 ** len(attributes)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    k = len(attributes)
    codes = _combos(n, [2] * k)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name, row in zip(names, codes):
        _save(root / "img_align_celeba" / name, picture(int(row[0]), int(row[1]), rng))
    signs = np.where(codes == 1, 1, -1)
    partition = _partitions(n, 2 ** k)
    if kaggle_csv:
        attrs = pd.DataFrame(signs, columns=list(attributes))
        attrs.insert(0, "image_id", names)
        attrs.to_csv(root / "list_attr_celeba.csv", index=False)
        pd.DataFrame({"image_id": names, "partition": partition}).to_csv(root / "list_eval_partition.csv", index=False)
    else:
        lines = [str(n), " ".join(attributes) + " "]
        lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, signs)]
        (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (root / "list_eval_partition.txt").write_text("".join(f"{a} {p}\n" for a, p in zip(names, partition)))
    return {"root": str(root), "target": "Blond_Hair", "sensitive": ["Male", "Young"], "image_size": 16}


def write_waterbirds(root: Path, n: int = 80, seed: int = 0) -> dict[str, Any]:
    """ROOT/metadata.csv (img_id, img_filename, y, split, place, place_filename) and the images."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    codes = _combos(n, [2, 2])
    folders = {0: "001.Black_footed_Albatross", 1: "002.Laysan_Albatross"}
    rows = []
    for i, (y, place) in enumerate(codes.tolist()):
        rel = f"{folders[y]}/bird_{i:04d}.jpg"
        _save(root / rel, picture(y, place, rng))
        rows.append({"img_id": i + 1, "img_filename": rel, "y": y, "place": place,
                     "place_filename": f"/a/b/{'water' if place else 'land'}_{i}.jpg"})
    frame = pd.DataFrame(rows)
    frame.insert(3, "split", _partitions(n, 4))
    frame.to_csv(root / "metadata.csv", index=False)
    return {"root": str(root), "image_size": 16}


def write_image_csv(root: Path, n: int = 120, seed: int = 0, split: bool = True) -> dict[str, Any]:
    """ROOT/metadata.csv (path, diagnosis, sex, site [, split]) with PNGs under ROOT/images/."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    codes = _combos(n, [2, 2, 3])
    rows = []
    for i, (y, sex, site) in enumerate(codes.tolist()):
        rel = f"images/scan_{i:04d}.png"
        _save(root / rel, picture(y, sex, rng, size=(20, 20)))
        rows.append({"path": rel, "diagnosis": ("benign", "malignant")[y], "sex": ("F", "M")[sex],
                     "site": ("north", "south", "west")[site]})
    frame = pd.DataFrame(rows)
    if split:
        frame["split"] = [("train", "val", "test")[p] for p in _partitions(n, 12)]
    frame.to_csv(root / "metadata.csv", index=False)
    return {"root": str(root), "target": "diagnosis", "sensitive": ["sex", "site"], "positive": "malignant",
            "image_size": 16}


def write_timeseries_arrays(root: Path, n: int = 240, channels: int = 2, length: int = 32, seed: int = 0,
                            table: str = "metadata.parquet", channels_last: bool = False,
                            split: bool = True, arrays: str = "arrays.npz") -> dict[str, Any]:
    """ROOT/arrays.npz (X: (N, C, T), or (N, T, C)) and a metadata table (label, sex, age_band, race
    [, split]); n should be a multiple of 24 (the combinations)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    codes = _combos(n, [2, 2, 3, 2])
    t = np.arange(length) / length
    cycles = np.where(codes[:, 0] == 1, 4.0, 1.0)[:, None, None]
    x = np.sin(2 * np.pi * cycles * t[None, None, :] + rng.uniform(0, 6.3, (n, channels, 1)))
    x = (x + 0.3 * rng.standard_normal((n, channels, length)) + 0.5 * codes[:, 1, None, None]).astype(np.float32)
    stored = x.transpose(0, 2, 1) if channels_last else x
    if arrays.endswith(".parquet"):  # one nested list per example
        pd.DataFrame({"X": [row.tolist() for row in stored]}).to_parquet(root / arrays)
    else:
        np.savez(root / arrays, X=stored)
    frame = pd.DataFrame({"label": codes[:, 0], "sex": np.array(["female", "male"])[codes[:, 1]],
                          "age_band": np.array(["18-39", "40-64", "65+"])[codes[:, 2]],
                          "race": np.array(["group_a", "group_b"])[codes[:, 3]]})
    if split:
        frame["split"] = [("train", "val", "test")[p] for p in _partitions(n, 24)]
    path = root / table
    frame.to_parquet(path) if path.suffix == ".parquet" else frame.to_csv(path, index=False)
    return {"root": str(root), "arrays": arrays, "metadata": table, "sensitive": ["sex", "age_band"],
            "channels_last": channels_last}
