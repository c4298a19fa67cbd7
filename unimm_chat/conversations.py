"""The conversation type every trainer input becomes, its one reader, and the writers of the export formats.

Formats read by `read_conversations(path)`:
    LLaVA JSON           [{"id", "image": "x.jpg" | "images": [...], "conversations": [{"from": "human"|"gpt", "value"}],
                           "lang"?}]  (a .json list, or one object per line in .jsonl)
    UniMM-Chat jsonl     {"image_name": "000000000285", "data": [{"from", "value"}, ...]} per line
    ShareGPT / LLaMA-Factory  {"messages": [{"role": "user"|"assistant"|"system", "content"}], "images": [...]}
    a Hugging Face dataset folder written by `write_hf_dataset` (or any with the LLaVA columns)
    UniMM-Chat parquet   the released files (UniMM-Chat_00000000-00000012.parquet): one conversation per row, columns
                         ds_name, image (the image's bytes, or a `datasets` Image struct {"bytes", "path"}),
                         conversation (a JSON string: [{"from": "human"|"gpt", "value"}]), origin_dataset, idx,
                         image_path; any other .parquet is read row by row like a dataset folder
`<image>` markers stay in the text, where the format put them.

The parquet files carry their images: each is written once, atomically, into a folder beside the file,
`{file stem}_images/{image_path}` (never rewritten: a rerun only checks it exists), and the conversation names it by
its absolute path, so a trainer finds it whatever `data.image_folder` says. The conversation's id is `idx`; a
conversation without any `<image>` marker gets one at the start of its first user turn (as LLaVA and Muffin do when
they train on such data).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mpm.core.errors import DataError
from mpm.core.files import atomic_write_bytes

try:
    import orjson as _json

    def _dumps(obj: Any) -> bytes:
        return _json.dumps(obj)

    _JSONDecodeError = _json.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is a dependency
    import json as _json

    def _dumps(obj: Any) -> bytes:
        return _json.dumps(obj, ensure_ascii=False).encode("utf-8")

    _JSONDecodeError = ValueError

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
FROM_TO_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


class ConversationFormatError(DataError):
    """A conversation file does not follow any of the formats read here."""


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Conversation:
    id: str
    images: list[str]
    messages: list[Message]
    lang: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # anything else a writer may keep (not read back)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _loads(data: bytes, where: str) -> Any:
    try:
        return _json.loads(data)
    except (_JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversationFormatError(f"{where}: not valid JSON ({exc})") from None


def _turns(items: Any, where: str, role_key: str, text_key: str, role_map: dict[str, str]) -> list[Message]:
    if not isinstance(items, list):
        raise ConversationFormatError(f"{where}: turns should be a list, got {type(items).__name__}")
    messages = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ConversationFormatError(f"{where}: turn {i} needs {role_key!r} and {text_key!r}, got {turn!r:.80}")
        role = role_map.get(turn[role_key])
        if role is None:
            raise ConversationFormatError(
                f"{where}: turn {i} has {role_key}={turn[role_key]!r}; expected one of {sorted(role_map)}"
            )
        if not isinstance(turn[text_key], str):
            raise ConversationFormatError(
                f"{where}: turn {i} {text_key!r} is {type(turn[text_key]).__name__}, not text"
            )
        messages.append(Message(role, turn[text_key]))
    return messages


def _images(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConversationFormatError(f"{where}: images should be a file name or a list of them, got {value!r:.80}")


def parse_record(obj: Any, where: str) -> Conversation:
    """One record of any supported format."""
    if not isinstance(obj, dict):
        raise ConversationFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    lang = obj.get("lang")
    if "conversations" in obj:  # LLaVA (and ShareGPT with from/value)
        images = _images(obj.get("images", obj.get("image")), where)
        messages = _turns(obj["conversations"], where, "from", "value", FROM_TO_ROLE)
        return Conversation(str(obj.get("id", where)), images, messages, lang)
    if "messages" in obj:  # LLaMA-Factory / ShareGPT with role/content
        images = _images(obj.get("images", obj.get("image")), where)
        messages = _turns(obj["messages"], where, "role", "content", {r: r for r in ROLES})
        return Conversation(str(obj.get("id", where)), images, messages, lang)
    if "data" in obj and "image_name" in obj:  # UniMM-Chat
        name = str(obj["image_name"])
        messages = _turns(obj["data"], where, "from", "value", FROM_TO_ROLE)
        return Conversation(name, [name if os.path.splitext(name)[1] else f"{name}.jpg"], messages, lang)
    raise ConversationFormatError(
        f"{where}: not a conversation record: expected 'conversations' (LLaVA), 'messages' (ShareGPT/LLaMA-Factory) "
        f"or 'image_name' + 'data' (UniMM-Chat); found keys {sorted(obj)[:10]}"
    )


def read_conversations(path: str | os.PathLike) -> Iterator[Conversation]:
    """Every conversation in a LLaVA .json/.jsonl, UniMM-Chat .jsonl, ShareGPT/LLaMA-Factory file or dataset folder."""
    path = Path(path)
    if path.is_dir():
        yield from _read_dataset_folder(path)
        return
    if not path.is_file():
        raise ConversationFormatError(f"{path}: no such file or folder")
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        for number, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                yield parse_record(_loads(line, f"{path} line {number}"), f"{path} line {number}")
        return
    records = _loads(data, str(path))
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise ConversationFormatError(f"{path}: expected a JSON list of conversations, got {type(records).__name__}")
    for i, obj in enumerate(records):
        yield parse_record(obj, f"{path} item {i}")


def _read_dataset_folder(path: Path) -> Iterator[Conversation]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ConversationFormatError(f"{path}: a folder, but not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for i, row in enumerate(ds):
        yield _parse_row(row, f"{path} row {i}")


def _parse_row(row: dict, where: str) -> Conversation:
    """A row of a table with the LLaVA (or ShareGPT) columns; empty columns are absent."""
    row = {k: v for k, v in row.items() if v is not None}
    if "images" in row and "image" in row:
        row.pop("image")
    return parse_record(row, where)


def parquet_image_folder(path: str | os.PathLike) -> Path:
    """Where the images of a UniMM-Chat parquet file are written: `{stem}_images/` beside it (an absolute path, not
    resolved through symlinks, so a file linked from a download cache gets its images beside the link)."""
    path = Path(os.path.abspath(path))
    return path.parent / f"{path.stem}_images"


def _read_parquet(path: Path) -> Iterator[Conversation]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        columns = set(table.schema_arrow.names)
    except (pa.ArrowException, OSError) as exc:
        raise ConversationFormatError(f"{path}: not a readable parquet file ({exc})") from None
    folder = parquet_image_folder(path)
    row = 0
    try:
        for batch in table.iter_batches(batch_size=64):  # the released files hold 1.6 GB of images each
            for record in batch.to_pylist():
                if "conversation" in columns:
                    yield _unimm_parquet_row(record, path, row, folder, has_images="image" in columns)
                else:
                    yield _parse_row(record, f"{path} row {row}")
                row += 1
    except (pa.ArrowException, OSError) as exc:  # a damaged file: the rows before were read
        raise ConversationFormatError(f"{path}: unreadable after row {row} ({exc})") from None


def _unimm_parquet_row(record: dict, path: Path, row: int, folder: Path, has_images: bool) -> Conversation:
    where = f"{path} row {row}"
    raw = record.get("conversation")
    if isinstance(raw, (str, bytes)):
        turns = _loads(raw, f"{where} field 'conversation'")
    elif isinstance(raw, list):  # already a list of turns
        turns = raw
    else:
        raise ConversationFormatError(
            f"{where}: field 'conversation' should be a JSON string of turns, got {type(raw).__name__}"
        )
    messages = _turns(turns, f"{where} field 'conversation'", "from", "value", FROM_TO_ROLE)
    if not messages:
        raise ConversationFormatError(f"{where}: field 'conversation' has no turns")
    idx = record.get("idx")
    conv_id = str(idx) if idx is not None else f"{path.stem}-{row}"
    meta = {k: record[k] for k in ("ds_name", "origin_dataset", "idx", "image_path") if record.get(k) is not None}
    if has_images:
        data, stored_name = _image_bytes(record.get("image"), where)
        name = _image_name(record.get("image_path"), stored_name, data, conv_id, where)
        target = folder / name
        if not target.is_file():  # written once: a rerun, or the next conversation about the same image, keeps it
            try:
                atomic_write_bytes(target, data)
            except OSError as exc:
                raise DataError(f"{where}: cannot write its image to {target} ({exc})") from None
        image = str(target)
    else:  # a copy without the image column: image_path names the image, found through data.image_folder
        image = _image_name(record.get("image_path"), None, b"", conv_id, where)
    if not any(IMAGE_TOKEN in m.content for m in messages):
        first = next((m for m in messages if m.role == "user"), None)
        if first is not None:
            first.content = f"{IMAGE_TOKEN}\n{first.content}"
    return Conversation(conv_id, [image], messages, record.get("lang"), meta)


def _image_bytes(value: Any, where: str) -> tuple[bytes, str | None]:
    """(the image's bytes, the file name a `datasets` Image struct stored with them, if any)."""
    stored = None
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        stored = value.get("path") if isinstance(value.get("path"), str) else None
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        got = "nothing" if value is None else type(value).__name__
        raise ConversationFormatError(f"{where}: field 'image' should hold the image's bytes, got {got}")
    if not value:
        raise ConversationFormatError(f"{where}: field 'image' is empty (0 bytes)")
    return bytes(value), stored


_MAGIC = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"RIFF": ".webp", b"BM": ".bmp"}


def _image_name(image_path: Any, stored: str | None, data: bytes, conv_id: str, where: str) -> str:
    """A relative file name for the image: `image_path`, else the name the struct stored, else `{id}.{format}`."""
    if image_path is not None and not isinstance(image_path, str):
        raise ConversationFormatError(f"{where}: field 'image_path' should be text, got {type(image_path).__name__}")
    name = image_path or (os.path.basename(stored) if stored else "")
    if not name:
        if not data:
            raise ConversationFormatError(f"{where}: field 'image_path' is empty and the row has no image")
        ext = next((e for magic, e in _MAGIC.items() if data.startswith(magic)), ".jpg")
        return f"{conv_id}{ext}"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
        raise ConversationFormatError(
            f"{where}: field 'image_path' {name!r} is not a relative file name (no leading /, no ..)"
        )
    return "/".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def to_llava(conv: Conversation) -> dict[str, Any]:
    record: dict[str, Any] = {"id": conv.id}
    if len(conv.images) == 1:
        record["image"] = conv.images[0]
    elif conv.images:
        record["images"] = conv.images
    record["conversations"] = [{"from": ROLE_TO_FROM[m.role], "value": m.content} for m in conv.messages]
    if conv.lang:
        record["lang"] = conv.lang
    return record


def write_llava_json(conversations: Iterable[Conversation], path: str | os.PathLike) -> int:
    records = [to_llava(c) for c in conversations]
    atomic_write_bytes(path, _dumps(records))
    return len(records)


def write_unimm_jsonl(conversations: Iterable[Conversation], path: str | os.PathLike) -> int:
    """The released UniMM-Chat layout: image_name is the image file name without its extension."""
    lines = []
    for conv in conversations:
        name = os.path.splitext(conv.images[0])[0] if conv.images else conv.id
        data = [{"from": ROLE_TO_FROM[m.role], "value": m.content} for m in conv.messages]
        lines.append(_dumps({"image_name": name, "data": data}))
    atomic_write_bytes(path, b"\n".join(lines) + (b"\n" if lines else b""))
    return len(lines)


def write_hf_dataset(conversations: Iterable[Conversation], folder: str | os.PathLike) -> int:
    """A Hugging Face dataset (save_to_disk) with LLaVA columns: id, image, images, conversations, lang."""
    import datasets
    import pyarrow as pa

    convs = list(conversations)
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    table = pa.table(
        {
            "id": pa.array([c.id for c in convs], pa.string()),
            "image": pa.array([c.images[0] if len(c.images) == 1 else None for c in convs], pa.string()),
            "images": pa.array([c.images for c in convs], pa.list_(pa.string())),
            "conversations": pa.array(
                [[{"from": ROLE_TO_FROM[m.role], "value": m.content} for m in c.messages] for c in convs],
                pa.list_(turn),
            ),
            "lang": pa.array([c.lang for c in convs], pa.string()),
        }
    )
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a "Saving the dataset" bar per export is noise in a command's output
    try:
        datasets.Dataset(table).save_to_disk(str(tmp))
    finally:
        if bars:
            datasets.enable_progress_bars()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return len(convs)
