"""Input readers: every input kind becomes a stream of `InputRow`s, in a stable order.

Kinds: tabular files (parquet, csv, tsv, jsonl; .gz too) with a URL-or-path column; a folder of images with
sidecar `.txt`/`.json` captions; existing webdataset shards (re-filter, re-shard); a Hugging Face dataset saved
with `save_to_disk`. A row that cannot be read (invalid UTF-8, broken JSON line) still becomes a row, with
`error` set, so it is counted and recorded as `failed_to_read` rather than lost.

Rows are small (no image bytes): images inside tar shards or datasets travel as a `source` locator that the
worker process resolves, so the coordinator never ships image payloads between processes.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dataproc.shard_layout import expand_paths
from dataproc.sharder.config import InputConfig
from mpm.core.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TABULAR_SUFFIXES = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
}


@dataclass(frozen=True)
class TarMember:
    """An image inside an uncompressed tar: read `size` bytes at `offset`."""

    tar_path: str
    offset: int
    size: int

    @property
    def where(self) -> str:
        return f"{self.tar_path} member at byte {self.offset}"


@dataclass(frozen=True)
class DatasetImage:
    """An image stored in a Hugging Face dataset saved on disk."""

    dataset_path: str
    split: str | None
    row: int
    column: str

    @property
    def where(self) -> str:
        split = f" split {self.split!r}" if self.split else ""
        return f"{self.dataset_path}{split} row {self.row} column {self.column!r}"


@dataclass
class InputRow:
    url: str | None  # recorded as `url`; fetched (http(s), file://, local path) when `source` is None
    caption: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    source: TarMember | DatasetImage | None = None
    error: str | None = None  # why the row could not be read; becomes status failed_to_read


# ---------------------------------------------------------------------------------------------------------------
# Resolving the input path


def _suffix(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix in sorted(TABULAR_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return os.path.splitext(name)[1]


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def resolve_input(cfg: InputConfig) -> tuple[str, list[str]]:
    """Decide the input format and the concrete list of files (or the one folder). Raises ConfigError."""
    paths = expand_paths(cfg.path)
    missing = [p for p in paths if not os.path.exists(p)]
    if not paths or missing:
        raise ConfigError(f"input {cfg.path!r}: no such file or folder{f' ({missing[0]})' if missing else ''}")
    fmt = cfg.format
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = Path(paths[0])
        if fmt in ("folder", "hf"):
            return fmt, [str(folder)]
        if fmt == "auto" and _is_hf_dataset_dir(folder):
            return "hf", [str(folder)]
        files = sorted(str(p) for p in folder.iterdir() if p.is_file())
        tars = [f for f in files if f.endswith(".tar")]
        tabular = [f for f in files if _suffix(f) in TABULAR_SUFFIXES]
        if fmt == "webdataset" or (fmt == "auto" and tars):
            return "webdataset", tars
        if fmt in ("parquet", "csv", "tsv", "jsonl"):
            return fmt, [f for f in tabular if TABULAR_SUFFIXES[_suffix(f)] == fmt]
        if fmt == "auto" and tabular:
            kinds = {TABULAR_SUFFIXES[_suffix(f)] for f in tabular}
            if len(kinds) > 1:
                raise ConfigError(f"input folder {folder} mixes {sorted(kinds)} files; set --input-format")
            return kinds.pop(), tabular
        return "folder", [str(folder)]
    if fmt == "auto":
        kinds = set()
        for p in paths:
            if p.endswith(".tar"):
                kinds.add("webdataset")
            elif _suffix(p) in TABULAR_SUFFIXES:
                kinds.add(TABULAR_SUFFIXES[_suffix(p)])
            else:
                raise ConfigError(
                    f"input {p!r}: cannot tell its format from the name; set --input-format to one of "
                    "parquet, csv, tsv, jsonl, webdataset"
                )
        if len(kinds) > 1:
            raise ConfigError(f"input {cfg.path!r} mixes formats {sorted(kinds)}; give one kind at a time")
        fmt = kinds.pop()
    return fmt, paths


def input_fingerprint(files: list[str], output: str | Path) -> list[list]:
    """What a resumed run compares to make sure it reads the same input: [[path, size], ...].

    An output folder inside an input folder (photos/ -> photos/shards/) is left out: it changes as the run goes.
    """
    output = Path(output).resolve()
    out = []
    for f in files:
        if os.path.isdir(f):
            size = sum(
                p.stat().st_size for p in Path(f).rglob("*") if p.is_file() and output not in p.resolve().parents
            )
        else:
            size = os.path.getsize(f)
        out.append([os.path.abspath(f), size])
    return out


def read_rows(cfg: InputConfig, fmt: str, files: list[str]) -> Iterator[InputRow]:
    """All rows of the input, in order."""
    return _check_column_types(_read_rows(cfg, fmt, files))


def _check_column_types(rows: Iterator[InputRow]) -> Iterator[InputRow]:
    """A saved column keeps the type of its first non-null value (one parquet type per column); a row whose value
    has another type becomes a failed_to_read row naming the column. Ints and floats mix freely."""
    first_type: dict[str, type] = {}
    for row in rows:
        for column, value in row.extra.items():
            if value is None:
                continue
            kind = float if isinstance(value, int | float) and not isinstance(value, bool) else type(value)
            expected = first_type.setdefault(column, kind)
            if kind is not expected:
                message = f"column {column!r} holds {type(value).__name__} but earlier rows hold {expected.__name__}"
                row.error = "; ".join(filter(None, [row.error, message]))
                row.extra[column] = None
        yield row


def _read_rows(cfg: InputConfig, fmt: str, files: list[str]) -> Iterator[InputRow]:
    if fmt in ("parquet", "csv", "tsv"):
        for f in files:
            yield from _read_table(f, fmt, cfg)
    elif fmt == "jsonl":
        for f in files:
            yield from _read_jsonl(f, cfg)
    elif fmt == "folder":
        yield from _read_folder(files[0], cfg)
    elif fmt == "webdataset":
        for f in files:
            yield from _read_tar(f, cfg)
    elif fmt == "hf":
        yield from _read_hf(files[0], cfg)
    else:  # resolve_input only returns the formats above
        raise ConfigError(f"unknown input format {fmt!r}")


def count_rows(fmt: str, files: list[str]) -> int | None:
    """Number of rows when it is cheap to know (for the progress bar), else None."""
    if fmt == "parquet":
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if fmt == "jsonl":
        total = 0
        for f in files:
            with _open_maybe_gzip(f) as fh:
                total += sum(1 for line in fh if line.strip())
        return total
    return None


# ---------------------------------------------------------------------------------------------------------------
# Text decoding: strict, with the failure recorded on the row


def _decode(value: Any, column: str) -> tuple[Any, str | None]:
    """bytes -> str (strict UTF-8). Invalid bytes give the text with U+FFFD and an error naming the column."""
    if not isinstance(value, bytes | bytearray):
        return value, None
    try:
        return bytes(value).decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return (
            bytes(value).decode("utf-8", errors="replace"),
            f"column {column!r} is not valid UTF-8 (byte 0x{value[exc.start]:02x} at position {exc.start})",
        )


def _make_row(values: dict[str, Any], cfg: InputConfig, where: str, require_url: bool = True) -> InputRow:
    errors = []
    decoded = {}
    for column, value in values.items():
        decoded[column], error = _decode(value, column)
        if error:
            errors.append(error)
    url = decoded.get(cfg.url_col)
    caption = decoded.get(cfg.caption_col)
    if url is not None and not isinstance(url, str):
        errors.append(f"column {cfg.url_col!r} holds {type(url).__name__} {url!r}, expected a URL or path string")
        url = str(url)
    if caption is not None and not isinstance(caption, str):
        errors.append(f"column {cfg.caption_col!r} holds {type(caption).__name__}, expected text")
        caption = str(caption)
    if require_url and (url is None or not url.strip()):
        errors.append(f"column {cfg.url_col!r} is empty")
    extra = {c: decoded.get(c) for c in cfg.save_additional_columns}
    error = f"{where}: " + "; ".join(errors) if errors else None
    return InputRow(url=url, caption=caption, extra=extra, error=error)


def _check_columns(found: list[str], cfg: InputConfig, path: str) -> None:
    wanted = [cfg.url_col, cfg.caption_col, *cfg.save_additional_columns]
    for column in wanted:
        if column not in found:
            flag = {cfg.url_col: "--url-col", cfg.caption_col: "--caption-col"}.get(
                column, "input.save_additional_columns"
            )
            raise ConfigError(
                f"{path}: no column {column!r}; columns found: {found}. Set {flag} to the right column name."
            )


# ---------------------------------------------------------------------------------------------------------------
# Tabular files


def _text_as_binary(table: pa.Table) -> pa.Table:
    """Cast string columns to binary so every value is decoded by `_decode` (strict UTF-8, errors recorded)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            target = pa.large_binary() if pa.types.is_large_string(f.type) else pa.binary()
            table = table.set_column(i, f.name, table.column(i).cast(target))
    return table


def _rows_of_table(
    table: pa.Table, cfg: InputConfig, path: str, first_row: int, require_url: bool = True
) -> Iterator[InputRow]:
    table = _text_as_binary(table)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    for i in range(table.num_rows):
        yield _make_row({c: v[i] for c, v in columns.items()}, cfg, f"{path} row {first_row + i}", require_url)


def _read_table(path: str, fmt: str, cfg: InputConfig) -> Iterator[InputRow]:
    wanted = list(dict.fromkeys([cfg.url_col, cfg.caption_col, *cfg.save_additional_columns]))
    base = os.path.dirname(os.path.abspath(path))
    if fmt == "parquet":
        pfile = pq.ParquetFile(path)
        _check_columns(pfile.schema_arrow.names, cfg, path)
        start = 0
        for batch in pfile.iter_batches(batch_size=8192, columns=wanted):
            table = pa.Table.from_batches([batch])
            yield from (_resolve_relative(row, base) for row in _rows_of_table(table, cfg, path, start))
            start += batch.num_rows
        return
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
            # Invalid UTF-8 must not fail the whole file: values are decoded one by one in _decode.
            convert_options=pacsv.ConvertOptions(check_utf8=False, strings_can_be_null=True),
        )
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{path}: cannot parse as {fmt.upper()}: {exc}") from None
    _check_columns(table.column_names, cfg, path)
    yield from (_resolve_relative(row, base) for row in _rows_of_table(table.select(wanted), cfg, path, 0))


def _resolve_relative(row: InputRow, base: str) -> InputRow:
    """Relative local paths in a URL column are relative to the input file's folder."""
    if row.url and "://" not in row.url and not os.path.isabs(row.url):
        row.url = os.path.join(base, row.url)
    return row


def _open_maybe_gzip(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_jsonl(path: str, cfg: InputConfig) -> Iterator[InputRow]:
    base = os.path.dirname(os.path.abspath(path))
    checked = False
    with _open_maybe_gzip(path) as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            try:
                text, utf8_error = raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                text = raw.decode("utf-8", errors="replace")
                utf8_error = f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at position {exc.start})"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield InputRow(url=None, caption=None, error=f"{where}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                yield InputRow(
                    url=None, caption=None, error=f"{where}: expected a JSON object, got {type(obj).__name__}"
                )
                continue
            if not checked:
                _check_columns(list(obj), cfg, path)
                checked = True
            row = _resolve_relative(_make_row(obj, cfg, where), base)
            if utf8_error:
                row.error = "; ".join(filter(None, [row.error, f"{where}: {utf8_error}"]))
            yield row


# ---------------------------------------------------------------------------------------------------------------
# A folder of images with sidecar captions


def _read_folder(folder: str, cfg: InputConfig) -> Iterator[InputRow]:
    root = Path(folder)
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ConfigError(
            f"input folder {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no tabular files found"
        )
    for image in images:
        where = str(image)
        txt, sidecar = image.with_suffix(".txt"), image.with_suffix(".json")
        values: dict[str, Any] = {}
        errors = []
        if sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_bytes())
                if not isinstance(meta, dict):
                    raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
                values.update(meta)
            except (ValueError, UnicodeDecodeError) as exc:
                errors.append(f"{sidecar}: unreadable ({exc})")
        if txt.is_file():
            values[cfg.caption_col] = txt.read_bytes().strip()
        values[cfg.url_col] = str(image)
        row = _make_row(values, cfg, where)
        if errors:
            row.error = "; ".join(([row.error] if row.error else []) + errors)
        yield row


# ---------------------------------------------------------------------------------------------------------------
# Existing webdataset shards


def _check_member_name(name: str) -> str | None:
    if name.startswith("/") or ".." in Path(name).parts:
        return f"unsafe tar member name {name!r}"
    return None


def _read_tar(path: str, cfg: InputConfig) -> Iterator[InputRow]:
    """Samples of an uncompressed tar, grouped as webdataset does (key = name up to the first dot)."""
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the `with tar` below; this only checks the format
    except tarfile.ReadError as exc:
        raise ConfigError(f"{path}: not an uncompressed tar ({exc}); decompress .tar.gz shards first") from None
    with tar:
        group: list[tarfile.TarInfo] = []
        current = None
        for member in tar:
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            key = os.path.join(directory, base.split(".", 1)[0])
            if key != current and group:
                yield _tar_sample(tar, path, current, group, cfg)
                group = []
            current = key
            group.append(member)
        if group:
            yield _tar_sample(tar, path, current, group, cfg)


def _tar_sample(
    tar: tarfile.TarFile, path: str, key: str, members: list[tarfile.TarInfo], cfg: InputConfig
) -> InputRow:
    where = f"{path} sample {key}"
    fields = {m.name[len(key) + 1 :].lower(): m for m in members}
    errors = [e for e in (_check_member_name(m.name) for m in members) if e]
    meta: dict[str, Any] = {}
    if "json" in fields:
        try:
            meta = json.loads(tar.extractfile(fields["json"]).read())
        except (ValueError, UnicodeDecodeError) as exc:
            errors.append(f"{key}.json unreadable ({exc})")
    caption: Any = tar.extractfile(fields["txt"]).read() if "txt" in fields else meta.get(cfg.caption_col)
    caption, caption_error = _decode(caption, "txt")
    if caption_error:
        errors.append(caption_error)
    image = next((fields[ext[1:]] for ext in IMAGE_EXTENSIONS if ext[1:] in fields), None)
    if image is None:
        errors.append(f"no image member (one of {', '.join(IMAGE_EXTENSIONS)}) among {sorted(fields)}")
    url = meta.get("url") if isinstance(meta.get("url"), str) else f"{path}#{key}"
    extra = {c: meta.get(c) for c in cfg.save_additional_columns}
    source = TarMember(os.path.abspath(path), image.offset_data, image.size) if image is not None else None
    error = f"{where}: " + "; ".join(errors) if errors else None
    return InputRow(url=url, caption=caption, extra=extra, source=source, error=error)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets saved on disk


def load_hf_dataset(path: str, split: str | None):
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("reading saved datasets needs `datasets`: pip install datasets") from exc
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{path}: the saved DatasetDict has splits {list(ds)}, not {split!r}; set input.split")
        ds = ds[split]
        return ds, split
    return ds, None


def _read_hf(path: str, cfg: InputConfig) -> Iterator[InputRow]:
    ds, split = load_hf_dataset(path, cfg.split)
    names = ds.column_names
    has_image = cfg.image_col in names
    if not has_image and cfg.url_col not in names:
        raise ConfigError(
            f"{path}: neither an image column {cfg.image_col!r} nor a URL column {cfg.url_col!r}; columns found: "
            f"{names}. Set input.image_col or --url-col."
        )
    wanted = [c for c in dict.fromkeys([cfg.url_col, cfg.caption_col, *cfg.save_additional_columns]) if c in names]
    missing = [c for c in [cfg.caption_col, *cfg.save_additional_columns] if c not in names]
    if missing:
        raise ConfigError(f"{path}: no column {missing[0]!r}; columns found: {names}")
    start = 0
    for table in ds.select_columns(wanted).with_format("arrow").iter(batch_size=8192):
        for row in _rows_of_table(table, cfg, path, start, require_url=not has_image):
            if has_image:
                row.source = DatasetImage(os.path.abspath(path), split, start, cfg.image_col)
                row.url = row.url or f"{path}#{start}"
            start += 1
            yield row


# Fetch threads share a worker's cache of opened datasets, and `datasets.load_from_disk` is not thread-safe (its
# progress bar creates, then deletes, a tqdm class lock that another thread's bar may be using): a dataset is opened
# once per process, under this lock.
_OPEN_DATASETS_LOCK = threading.Lock()


def _open_dataset(source: DatasetImage, datasets_cache: dict):
    key = (source.dataset_path, source.split, source.column)
    ds = datasets_cache.get(key)
    if ds is None:
        with _OPEN_DATASETS_LOCK:
            ds = datasets_cache.get(key)
            if ds is None:  # the first thread opens it; the others waited and use it
                from datasets import Image

                ds, _ = load_hf_dataset(source.dataset_path, source.split)
                ds = datasets_cache[key] = ds.cast_column(source.column, Image(decode=False))
    return ds


def read_source_bytes(source: TarMember | DatasetImage, datasets_cache: dict) -> bytes:
    """Resolve a locator to image bytes (runs in the worker process, from any of its fetch threads).

    `datasets_cache` holds the datasets this process opened (one per worker, shared by its threads). Raises when the
    image cannot be read; the worker records that as `failed_to_read`, naming `source.where`.
    """
    if isinstance(source, TarMember):
        with open(source.tar_path, "rb") as f:
            f.seek(source.offset)
            data = f.read(source.size)
        if len(data) != source.size:
            raise EOFError(f"the tar ends {len(data)} bytes into a member of {source.size} bytes")
        return data
    value = _open_dataset(source, datasets_cache)[source.row][source.column]
    if value is None:
        raise ValueError(f"row {source.row} has no image in column {source.column!r}")
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    if isinstance(value, bytes):
        return value
    raise ValueError(f"column {source.column!r} row {source.row} holds {type(value).__name__}, not an image")
