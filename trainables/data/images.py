"""Image files on disk behind the ``Dataset`` interface, streamed by DataLoader worker processes.

The layouts (CelebA, Waterbirds, a CSV) only differ in how they list files and metadata; this module
does the rest once: it checks at construction that every listed file exists (a missing file fails the
plan, naming it), decodes with PIL (JPEG draft mode, so large photos decode at reduced scale) and turns
the image into pixels with a ``Preprocessing`` through timm's evaluation transform. Without a model that
is the shorter side resized to ``image_size``, a centre square and ImageNet's mean and std;
``for_model(data_config)`` returns a view with the model's own statistics, interpolation and crop (a
CLIP or 0.5/0.5 model fed ImageNet statistics runs, silently worse). A file that cannot be decoded
raises ``ImageReadError`` naming it; nothing is skipped.

Decoding JPEGs in every epoch of every trial starves a GPU, so a sweep uses ``with_input_cache``: each
split is decoded once (by the same worker processes) into resized uint8 pixels, a memory-mapped ``.npy``
under the storage path's ``_decoded_cache`` that the workers of a node share, and every batch after that
is a copy and a normalisation, bit for bit the pixels streaming would give.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from trainables.data.base import (PATH, Batches, Dataset, DatasetError, Option, SplitMeta, batch_order,
                                  canonical_options, check_indices, check_split)
from trainables.data.preprocessing import IMAGENET_MEAN as _MEAN
from trainables.data.preprocessing import IMAGENET_STD as _STD
from trainables.data.preprocessing import Preprocessing
from trainables.array_cache import ArrayCache
from trainables.data.tables import Table

__all__ = ["FolderImages", "ImageReadError", "decode_image", "decode_pixels", "image_options", "check_files",
           "resolve_root", "file_digest", "IMAGENET_MEAN", "IMAGENET_STD", "DECODED_CACHE_DIRNAME",
           "DECODED_BUDGET_BYTES"]

DECODED_CACHE_DIRNAME = "_decoded_cache"
DECODED_BUDGET_BYTES = 16 << 30  # 16 GiB per folder (resources.input_cache_gb; CelebA at 64 px: 2.5 GiB); LRU
_FILL_BATCH = 64
IMAGENET_MEAN = np.array(_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(_STD, dtype=np.float32)
_SHOWN = 5


class ImageReadError(DatasetError):
    """An image file that PIL cannot decode; the message names the file."""


def image_options(image_size: int = 64) -> dict[str, Option]:
    """Options every image-folder adapter shares (besides the table options)."""
    return {
        "root": Option(None, PATH, doc="the dataset's folder; relative paths resolve against the working "
                                       "directory, so prefer an absolute path"),
        "image_size": Option(image_size, int, 8, 1024, doc="images are resized and centre-cropped to this square"),
        "num_workers": Option(2, int, 0, 64, doc="DataLoader worker processes decoding images; 0 decodes in "
                                                 "the trial's process", identity=False),
        "verify_images": Option(False, bool, doc="decode every image once at construction, so an unreadable "
                                                 "file fails the plan rather than a trial (slow for large "
                                                 "datasets)", identity=False),
    }


def resolve_root(value: str | None, layout: str) -> Path:
    """The absolute dataset folder; a clear error when it is not given or does not exist."""
    if value is None:
        raise DatasetError(f"dataset.options.root is required: the folder holding the {layout} layout")
    root = Path(os.path.expanduser(value)).absolute()  # pathlib raises on an unknown ~user
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        shown = repr(value) if str(root) == value else f"{value!r} ({root})"
        raise DatasetError(f"dataset.options.root {shown} {what}; point it at the folder holding the {layout} "
                           f"layout (relative roots resolve against the working directory {os.getcwd()})")
    return root


def file_digest(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of metadata files: part of a fingerprint, so edited labels change cache keys."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def check_files(paths: Sequence[str], where: str) -> None:
    """Raise naming the missing files; lists each folder once instead of one stat per file."""
    listing: dict[str, set[str]] = {}
    missing = []
    for p in paths:
        folder, name = os.path.split(p)
        if folder not in listing:
            try:
                with os.scandir(folder) as it:
                    listing[folder] = {e.name for e in it}
            except OSError:
                listing[folder] = set()
        if name not in listing[folder]:
            missing.append(p)
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
        raise DatasetError(f"{where} lists {len(missing)} image files that do not exist: {shown}; restore them or "
                           "remove their rows (nothing is skipped silently)")


def _preprocessing(preprocessing: Preprocessing | int) -> Preprocessing:
    return Preprocessing.imagenet(preprocessing) if isinstance(preprocessing, int) else preprocessing


def decode_pixels(path: str, preprocessing: Preprocessing | int) -> np.ndarray:
    """uint8 (3, H, W): the file decoded, resized and cropped as ``preprocessing`` says, not yet normalised
    (what the decoded-image cache holds); an int ``size`` means ``Preprocessing.imagenet(size)``."""
    from PIL import Image  # Pillow where files are decoded (the loader's workers)

    pre = _preprocessing(preprocessing)
    scale = math.floor(max(pre.input_size[1:]) / min(pre.crop_pct, 1.0))  # the resize before the crop
    try:
        with Image.open(path) as im:
            im.draft("RGB", (scale, scale))  # JPEG decodes at the smallest scale still >= what is resized to
            return pre.pixels(im.convert("RGB"))
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise ImageReadError(f"cannot read image {path} ({type(exc).__name__}: {exc}); replace the file or remove "
                             "its row from the metadata") from None


def decode_image(path: str, preprocessing: Preprocessing | int) -> np.ndarray:
    """float32 (3, H, W) pixels of the file as ``preprocessing`` makes them; an int ``size`` means
    ``Preprocessing.imagenet(size)`` (shorter side to size, centre square, ImageNet statistics)."""
    pre = _preprocessing(preprocessing)
    return pre.normalize(decode_pixels(path, pre)).numpy()


class _Decoder(torch.utils.data.Dataset):
    """Decodes a whole batch of positions per call, so each worker returns one stacked tensor: float32
    pixels as the model sees them, or (``raw``) the uint8 ones the decoded-image cache stores."""

    def __init__(self, paths: np.ndarray, pre: Preprocessing, raw: bool = False):
        self.paths, self.pre, self.raw = paths, pre, raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pos = np.atleast_1d(np.asarray(pos, dtype=np.int64))
        x = torch.from_numpy(np.stack([decode_pixels(self.paths[i], self.pre) for i in pos.tolist()]) if len(pos)
                             else np.zeros((0, *self.pre.input_size), dtype=np.uint8))
        return (x if self.raw else self.pre.normalize(x)), torch.from_numpy(pos)


def _loader(decoder: _Decoder, order: list[np.ndarray], workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over batches of positions. Its own generator seeds the workers, so making one leaves the
    trial's random stream (what dropout draws from) as it was, whether batches come from files or a cache."""
    return torch.utils.data.DataLoader(decoder, batch_size=None, sampler=order, num_workers=min(workers, len(order)),
                                       pin_memory=torch.cuda.is_available() and not decoder.raw,
                                       generator=torch.Generator().manual_seed(0))


class _Stream:
    """A DataLoader whose workers stop as soon as iteration ends or fails: left to the garbage collector,
    a failed multi-process iterator holds its workers for seconds."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        try:
            yield from it
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ calls
            if shutdown is not None:
                shutdown()


def _files_key(prefix: str, stats: Sequence[str]) -> str:
    """sha256 over ``prefix`` and each file's identity (``FolderImages._file_stats``), in row order."""
    h = hashlib.sha256(prefix.encode())
    for line in stats:
        h.update(line.encode())
    return h.hexdigest()


class _Cached:
    """Batches ``(x, pos)`` of ``rows`` read from decoded uint8 pixels (memory-mapped) and normalised."""

    def __init__(self, pixels: np.ndarray, rows: np.ndarray, order: list[np.ndarray], pre: Preprocessing):
        self.pixels, self.rows, self.order, self.pre = pixels, rows, order, pre

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in self.order:
            yield self.pre.normalize(np.asarray(self.pixels[self.rows[b]])), torch.from_numpy(b)


class FolderImages(Dataset):
    """Image files plus an encoded metadata table; built by the layout adapters (celeba, waterbirds, ...)."""

    modality = "image"
    in_memory = False

    def __init__(self, *, name: str, version: int, options: Mapping[str, Any], schema: Mapping[str, Option],
                 table: Table, paths: np.ndarray, digest: str, where: str):
        self.name = name
        self.options = dict(options)
        size = int(options["image_size"])
        self.input_shape = (3, size, size)
        self.preprocessing = Preprocessing.imagenet(size)  # until for_model names a model's own
        self.primary = table.primary
        self.group_names = dict(table.group_names)
        self._table = table
        self._paths = {split: paths[table.rows[split]] for split in table.rows}
        self._num_workers = int(options["num_workers"])
        self._decoded: ArrayCache | None = None  # with_input_cache's decoded-image cache
        self._decoded_splits: dict[tuple, np.ndarray | None] = {}  # shared by views: see _decoded_pixels
        # root is left out: the same files moved elsewhere are the same data; the digest covers the metadata,
        # and each file's size and modification time (_files_digest, on first use) cover the pixels
        identity = canonical_options(options, schema, leave_out=("root",))
        self._files_fingerprint = f"{name}/v{version}:{identity}:{digest}"
        self._all_paths = paths
        # as the layouts made the paths (symlinks not followed); a layout without a root: the files' common folder
        self._root = (str(resolve_root(options["root"], name)) if options.get("root")
                      else os.path.commonpath(paths.tolist()) if len(paths) else "/")
        self._content: dict[str, str] = {}  # shared by every view (their __dict__ copies hold this one dict)
        check_files(paths.tolist(), where)
        if options.get("verify_images"):
            for p in paths.tolist():
                decode_image(p, size)

    def meta(self, split: str) -> SplitMeta:
        return self._table.metas[check_split(split)]

    def paths(self, split: str) -> np.ndarray:
        """The image files of ``split`` in row order (read-only view for reports and tests)."""
        out = self._paths[check_split(split)].view()
        out.setflags(write=False)
        return out

    def inputs(self, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        idx = check_indices(indices, len(self.meta(split)), split)
        decoded = self._decoded_pixels(split)
        if decoded is not None:
            return self.preprocessing.normalize(np.asarray(decoded[idx]))
        return _Decoder(self._paths[split][idx], self.preprocessing)[np.arange(len(idx))][0]

    def loader(self, split: str, indices: np.ndarray | None = None, *, batch_size: int, shuffle: bool = False,
               seed: int = 0, epoch: int = 0, drop_last: bool = False, num_workers: int | None = None) -> Batches:
        idx = check_indices(indices, len(self.meta(split)), split)
        order = batch_order(len(idx), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
        decoded = self._decoded_pixels(split)
        if decoded is not None:  # from memory: a copy and a normalisation per batch, no worker processes
            return _Cached(decoded, idx, order, self.preprocessing)
        workers = self._num_workers if num_workers is None else int(num_workers)
        return _Stream(_loader(_Decoder(self._paths[split][idx], self.preprocessing), order, workers))

    def with_input_cache(self, folder: str | os.PathLike | None, budget_bytes: int | None = None) -> Dataset:
        """A view that decodes each split's files once into a uint8 array under ``folder`` (memory-mapped,
        shared by the workers of a node) and feeds every later batch from it; None: self.

        The pixels are exactly the streamed ones (``Preprocessing.pixels`` then ``normalize``). An entry is
        keyed by the preprocessing's geometry and each file's path, size and modification time, in row
        order, so a changed, added or removed file makes a new entry (unchanged files count as unchanged
        content, as for make or rsync: hashing every byte would cost what the cache saves). Entries share a
        budget (a sweep's ``resources.input_cache_gb``, ``DECODED_BUDGET_BYTES`` by default; least recently
        read out); a split that alone exceeds it is streamed from the files."""
        if folder is None:
            return self
        view = copy.copy(self)
        view._decoded = ArrayCache(folder, DECODED_BUDGET_BYTES if budget_bytes is None else budget_bytes)
        return view

    def _decoded_pixels(self, split: str) -> np.ndarray | None:
        """The split's uint8 pixels from the decoded-image cache (decoding them first if absent); None when
        this dataset has no cache or the split does not fit its budget."""
        if self._decoded is None:
            return None
        # opened once per process: every view of this dataset (one per trial) shares the memo
        memo = (str(self._decoded.root), self._decoded.budget_bytes, split, self.preprocessing.geometry())
        if memo not in self._decoded_splits:
            paths = self._paths[split]
            shape = (len(paths), *self.preprocessing.input_size)
            if not self._decoded.fits(int(np.prod(shape))):
                self._decoded_splits[memo] = None
            else:
                decoder = _Decoder(paths, self.preprocessing, raw=True)

                def fill(out: np.ndarray) -> None:
                    order = batch_order(len(paths), _FILL_BATCH, shuffle=False)
                    for x, pos in _Stream(_loader(decoder, order, self._num_workers)):
                        out[pos.numpy()] = x.numpy()

                stats = self._file_stats()
                key = _files_key(f"decoded/v2|{self.preprocessing.geometry()}",
                                 [stats[i] for i in self._table.rows[split].tolist()])[:24]
                self._decoded_splits[memo] = self._decoded.get_or_fill(key, shape, np.uint8, fill)
        return self._decoded_splits[memo]

    def __copy__(self) -> FolderImages:  # views (for_model, with_input_cache) share the decoded-pixels memo
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        return view

    def __getstate__(self) -> dict[str, Any]:  # the memo's memory maps (and the files' stats) are not shipped
        return {**self.__dict__, "_decoded_splits": {},
                "_content": {k: v for k, v in self._content.items() if k != "stats"}}

    def for_model(self, data_config: Any) -> Dataset:
        """A view whose ``inputs``/``loader`` make pixels as ``data_config`` says (timm's data config dict
        or a ``Preprocessing``; its input_size becomes ``input_shape``); None or the current one: self.
        The view shares files and metadata; its fingerprint names the preprocessing."""
        if data_config is None:
            return self
        pre = Preprocessing.from_config(data_config)
        if pre == self.preprocessing:
            return self
        view = copy.copy(self)
        view.preprocessing, view.input_shape = pre, pre.input_size
        return view

    def fingerprint(self) -> str:
        # the pixels depend on the preprocessing as much as on the files, so every cache keyed by this knows it
        return f"{self._files_fingerprint}:{self._files_digest()}|preprocessing:{self.preprocessing.canonical()}"

    def _files_digest(self) -> str:
        """sha256 over each file's path under the root, size and modification time, in row order: two folders
        with the same metadata but other images (a copy with faces blurred, a re-export) are other data, while
        the same files moved (mv, rsync -a, copytree) keep their key."""
        if "files" not in self._content:
            self._content["files"] = _files_key("files/v1", self._file_stats())[:16]
        return self._content["files"]

    def _file_stats(self) -> list[str]:
        """Each file's path under the root, size and modification time, in the table's row order: what the
        fingerprint and the decoded-image cache's keys are made of. One stat per file, once per process (every
        view shares the memo)."""
        if "stats" not in self._content:
            lines = []
            for p in self._all_paths.tolist():
                st = os.stat(p)
                lines.append(f"\0{os.path.relpath(p, self._root)}\0{st.st_size}\0{st.st_mtime_ns}")
            self._content["stats"] = lines
        return self._content["stats"]
