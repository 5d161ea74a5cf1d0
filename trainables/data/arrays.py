"""``timeseries_arrays``: your own time series as an array file plus a metadata table.

Layout::

    ROOT/arrays.npz      an array under key ``array_key`` (default "X") of shape (N, C, T), or (N, T, C)
                         with ``channels_last: true`` (e.g. MIMIC-III's 48 hours x 76 features);
                         a plain .npy file works too, and so does a .parquet file whose column
                         ``array_key`` holds one nested list per example (C lists of T values, or T
                         lists of C with ``channels_last``), every example the same shape
    ROOT/metadata.csv    N rows in the same order (.csv or .parquet): target and sensitive columns,
                         optional split column (see image_csv for the split rules)

The array's header is read at construction (shape and dtype are checked against the table without
loading the data); the values are loaded once, on first use, into an in-memory float32 tensor, and
non-finite values are an error naming the rows. Values are used as stored: standardise them
beforehand if the features have different scales.

pyarrow is imported inside the functions that read Parquet or Feather files: ``.npz`` and CSV
sources never need it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from trainables.data.base import (DATASETS, PATH, Dataset, DatasetError, Option, SplitMeta, canonical_options,
                                  check_indices, check_split, parse_options)
from trainables.data.images import file_digest, resolve_root
from trainables.data.tables import Table, build_table, read_table, split_of, table_options

__all__ = ["OPTIONS", "TimeseriesArrays", "array_header"]

VERSION = 1

OPTIONS: Mapping[str, Option] = {
    "root": Option(None, PATH, doc="the folder holding the array file and the metadata table"),
    "arrays": Option("arrays.npz", PATH, doc="the .npz, .npy or .parquet file, relative to root", under_root=True),
    "array_key": Option("X", str, doc="the array's name inside the .npz, or its column in the .parquet"),
    "metadata": Option("metadata.csv", PATH, doc="the .csv or .parquet table, relative to root", under_root=True),
    "channels_last": Option(False, bool, doc="true when the array is (N, T, C) rather than (N, C, T)"),
    **table_options(target="label", sensitive=("group",), user_table=True),
}


def array_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array in a .npy file or under ``key`` in a .npz, without loading it."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r")
        return tuple(arr.shape), arr.dtype
    if path.suffix.lower() == ".parquet":
        return _parquet_header(path, key)
    if path.suffix.lower() != ".npz":
        raise DatasetError(f"array file {path} has suffix {path.suffix!r}; use .npz, .npy or .parquet")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if key not in names:
                raise DatasetError(f"{path} holds no array {key!r} (dataset.options.array_key); it has {names}")
            with zf.open(f"{key}.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
    except zipfile.BadZipFile:
        raise DatasetError(f"array file {path} is not a readable .npz (bad zip); re-save it with numpy.savez") from None
    return tuple(shape), np.dtype(dtype)


def _parquet_column(path: Path, key: str, *, first_row_only: bool) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"array file {path} is not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise DatasetError(f"{path} has no column {key!r} (dataset.options.array_key); it has {names}")
    kind = pf.schema_arrow.field(key).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
            pa.types.is_list(kind.value_type) or pa.types.is_large_list(kind.value_type)
            or pa.types.is_fixed_size_list(kind.value_type)) or not (
            pa.types.is_floating(kind.value_type.value_type) or pa.types.is_integer(kind.value_type.value_type)):
        raise DatasetError(f"{path}: column {key!r} is {kind}; it must hold one nested list of numbers per example "
                           "(C lists of T values, or T lists of C with channels_last)")
    if first_row_only:
        return pf.metadata.num_rows, next(pf.iter_batches(batch_size=1, columns=[key])).column(0), kind
    return pf.metadata.num_rows, pq.read_table(path, columns=[key]).column(key).combine_chunks(), kind


def _parquet_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    n, first, kind = _parquet_column(path, key, first_row_only=True)
    rows = first.to_pylist()[0] or []
    return (n, len(rows), len(rows[0]) if rows else 0), np.dtype(kind.value_type.value_type.to_pandas_dtype())


def _parquet_array(path: Path, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The (N, A, B) array from one nested list per row; rows of another shape are named, never padded."""
    import pyarrow.compute as pc

    n, column, _ = _parquet_column(path, key, first_row_only=False)
    outer = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    inner_lists = pc.list_flatten(column)
    inner = pc.list_value_length(inner_lists).to_numpy(zero_copy_only=False)
    row_of_inner = np.repeat(np.arange(n), np.nan_to_num(outer, nan=0).astype(int))
    bad = set(np.flatnonzero(outer != shape[1]).tolist()) | set(row_of_inner[inner != shape[2]].tolist())
    if bad:
        rows = sorted(bad)
        raise DatasetError(f"{path}: column {key!r} rows {rows[:5]} ({len(rows)} in all, counted from 0) are not "
                           f"{shape[1]} x {shape[2]} like the first row; every example must have the same shape")
    values = pc.list_flatten(inner_lists).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, shape[1], shape[2])


class TimeseriesArrays(Dataset):
    """An (N, C, T) array held in memory, with splits and groups from its metadata table."""

    modality = "timeseries"

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.name = "timeseries_arrays"
        self.options = parse_options(options, OPTIONS)
        o = self.options
        root = resolve_root(o["root"], "timeseries_arrays")
        self._array_file = (root / o["arrays"]).absolute()
        meta_file = (root / o["metadata"]).absolute()
        if not self._array_file.is_file():
            raise DatasetError(f"array file {self._array_file} does not exist; check dataset.options.root and "
                               "dataset.options.arrays")
        shape, dtype = array_header(self._array_file, o["array_key"])
        self._shape = shape
        if len(shape) != 3 or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
            raise DatasetError(f"{self._array_file}: array {o['array_key']!r} has shape {shape} and dtype {dtype}; "
                               "expected a real-valued (N, C, T) array, or (N, T, C) with channels_last: true")
        frame = read_table(meta_file, "metadata table (dataset.options.metadata)")
        if len(frame) != shape[0]:
            raise DatasetError(f"{meta_file} has {len(frame)} rows but {self._array_file.name} holds {shape[0]} "
                               "examples; row i of the table must describe example i of the array")
        where = str(meta_file)
        self._table: Table = build_table(frame, where=where, options=o, partition=split_of(frame, o, where))
        self.input_shape = (shape[2], shape[1]) if o["channels_last"] else (shape[1], shape[2])
        self.primary = self._table.primary
        self.group_names = dict(self._table.group_names)
        digest = file_digest([self._array_file, meta_file])
        self._fingerprint = f"{self.name}/v{VERSION}:{canonical_options(o, OPTIONS, leave_out=('root',))}:{digest}"
        self._x: torch.Tensor | None = None  # loaded on first use; not pickled

    def _load(self) -> torch.Tensor:
        if self._x is None:
            o = self.options
            if self._array_file.suffix.lower() == ".npy":
                x = np.load(self._array_file).astype(np.float32, copy=False)
            elif self._array_file.suffix.lower() == ".parquet":
                x = _parquet_array(self._array_file, o["array_key"], self._shape)
            else:
                with np.load(self._array_file) as data:
                    x = data[o["array_key"]].astype(np.float32, copy=False)
            if o["channels_last"]:
                x = np.ascontiguousarray(x.transpose(0, 2, 1))
            bad = np.flatnonzero(~np.isfinite(x).all(axis=(1, 2)))
            if len(bad):
                raise DatasetError(f"{self._array_file}: examples {bad[:5].tolist()} ({len(bad)} in all, counted from 0) "
                                   "hold NaN or infinite values; impute or remove them (and their table rows)")
            self._x = torch.from_numpy(x)
        return self._x

    def check(self) -> None:
        """Load the array once in the driver, so NaN or infinite values fail the plan, not every trial."""
        self._load()
        self._x = None  # not kept in the driver's memory

    def meta(self, split: str) -> SplitMeta:
        return self._table.metas[check_split(split)]

    def inputs(self, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        idx = check_indices(indices, len(self.meta(split)), split)
        return self._load()[torch.from_numpy(self._table.rows[split][idx])]

    def fingerprint(self) -> str:
        return self._fingerprint

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_x": None}


DATASETS.register("timeseries_arrays", options=OPTIONS,
                  doc="Your time series: an (N, C, T) .npz/.npy/.parquet array plus a .csv/.parquet metadata "
                      "table.")(TimeseriesArrays)
