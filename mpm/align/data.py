"""Preference pairs for DPO / dense DPO: every supported file format into one type, `PreferencePair`.

Formats read by `read_preferences(path, images=None, fmt="auto")`, detected from the extension and the keys of the
first record that matches a format (jsonl/json; the rows before it are skipped with their reason) or the columns
(parquet):

    fmt            file                    detected by                    one record
    mpm            .jsonl / .json          `question`, `chosen`,          {"id", "image", "question", "chosen",
                                           `rejected`                     "rejected", "lang"}  (DESIGN.md)
    rlaifv         .parquet                the same three columns         openbmb/RLAIF-V-Dataset: ds_name,
                                                                          image {bytes, path}, question, chosen,
                                                                          rejected, origin_dataset, origin_split,
                                                                          idx, image_path
    rlhfv          .parquet (.jsonl)       `text`, no `chosen`            HaoyeZhang/RLHF-V-Dataset: image {bytes,
                                                                          path}, text (a JSON string {"question",
                                                                          "chosen", "rejected", ...}),
                                                                          origin_dataset, origin_split, idx,
                                                                          image_path
    llamafactory   .json / .jsonl          `conversations` or `messages`  LLaMA-Factory ranking data, sharegpt:
                   (.parquet)              (or alpaca `instruction`)      {"conversations": [{"from": "human",
                                           with `chosen`, `rejected`      "value": "<image>..."}], "chosen": {"from":
                                                                          "gpt", "value"}, "rejected": {...},
                                                                          "images": ["a.jpg"]}; role/content turns
                                                                          and plain-string answers too; alpaca:
                                                                          {"instruction", "input", "chosen",
                                                                          "rejected", "images"}
    trl            .jsonl / .json /        `prompt`, `chosen`,            TRL vision DPO: {"prompt", "chosen",
                   .parquet                `rejected`                     "rejected", "images": [...]}, each text a
                                                                          string or a list of messages whose content
                                                                          is a string or parts [{"type": "image"},
                                                                          {"type": "text", "text": ...}]

Images: a path (relative to `images`, else to the data file's folder) becomes a `Path` that is checked to exist;
bytes (a parquet `{"bytes", "path"}` struct or a binary column) stay bytes, checked to decode. Nothing is decoded
for the trainer here: `open_image(pair)` does that when it needs the pixels. A pair holds at most one image.

Questions: the `<image>` placeholder (LLaVA / LLaMA-Factory) is removed, with the white space around it, so
`"<image>\\nWhat is this?"` reads `"What is this?"` and `"Look at <image> here"` reads `"Look at here"`; the trainer puts
the image where its own template says. TRL's `{"type": "image"}` parts are dropped the same way; text parts are
joined with a newline. `chosen` and `rejected` are kept as written.

A row that cannot be a pair is skipped, counted by reason and logged sparingly (`SkipLog`), never fatal:
    bad_json        a jsonl line, or RLHF-V's `text`, that is not a JSON object
    missing_field   question, chosen or rejected absent (or null)
    bad_field       a field of the wrong type (a number for a text, an image that is neither path nor bytes)
    empty           question, chosen or rejected empty (after the placeholder is removed)
    identical       chosen == rejected (ignoring surrounding white space): no preference, so no gradient
    multi_turn      a prompt with earlier turns: a pair holds one question
    multi_image     more than one image: a pair holds one
    missing_image   an image path that is not a file
    bad_image       image bytes Pillow cannot open
A whole-file problem (no such file, unknown extension, no record in any format read here, unreadable parquet)
raises `DataError`; a record that matches no format before the format is known is skipped as `missing_field`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mpm.core.errors import ConfigError, DataError
from mpm.core.images import ImageError, upright_rgb
from mpm.core.images import open_image as open_image_file
from mpm.core.skips import SkipLog

logger = logging.getLogger(__name__)

FORMATS = ("mpm", "rlaifv", "rlhfv", "llamafactory", "trl")
IMAGE_MARKER = re.compile(r"\s*<image>\s*")
_USER_ROLES = {"human", "user"}
_SYSTEM_ROLES = {"system"}


@dataclass
class PreferencePair:
    id: str
    image: Path | bytes | None  # a file, the encoded bytes of one, or no image; `open_image` decodes it
    question: str  # without `<image>` placeholders
    chosen: str
    rejected: str
    lang: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # every other field of the record (origin_dataset, ...)
    source: str = ""  # where it was read: "data.parquet row 3", for error messages
    row: int = 0  # the record's number in its file (rows skipped by the reader count too): a stable key


@dataclass
class SkippedRow:
    where: str  # "pairs.jsonl line 4"
    reason: str  # one of the reasons in the module docstring
    detail: str


@dataclass
class PreferenceSet:
    path: Path
    format: str
    pairs: list[PreferencePair]
    skipped: list[SkippedRow]

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    @property
    def counts(self) -> dict[str, int]:
        """Skipped rows by reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def summary(self) -> str:
        line = f"{self.path}: {len(self.pairs)} preference pairs ({self.format})"
        if self.skipped:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.counts.items(), key=lambda x: -x[1]))
            line += f", {len(self.skipped)} rows skipped ({reasons})"
        return line


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_preferences(
    path: str | os.PathLike, images: str | os.PathLike | None = None, fmt: str = "auto"
) -> PreferenceSet:
    """Every usable preference pair of a file, and the rows skipped with their reasons.

    Args:
        path: a .jsonl, .json or .parquet file in one of the formats of the module docstring.
        images: the folder that relative image paths are under; default the data file's folder.
        fmt: "auto" (detect), or one of `FORMATS` to skip detection.
    Raises:
        DataError: the file is missing, unreadable or in no format read here (the message names the keys found).
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"preference format {fmt!r} is unknown; use 'auto' or one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such preference file")
    folder = Path(images) if images is not None else path.parent
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} (for {path}) is not a folder")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(
            f"{path}: preference data should be .jsonl, .json or .parquet, got {path.suffix or 'no suffix'!r}"
        )

    skips = SkipLog(logger, "preference row")
    skipped: list[SkippedRow] = []
    records = _parquet_records(path) if path.suffix == ".parquet" else _json_records(path)
    pairs: list[PreferencePair] = []
    parse = None
    unmatched: set[str] = set()  # keys of the records that matched no format, while none has
    for where, number, record in records:
        try:
            if isinstance(record, _BadRow):
                raise record
            if not isinstance(record, dict):
                raise _BadRow("bad_field", f"expected a JSON object, got {type(record).__name__}")
            if parse is None:  # the first record that matches a format decides it for the whole file
                detected = _detect(path, record) if fmt == "auto" else fmt
                if detected is None:  # skipped: a later record may still match
                    keys = sorted(map(str, record))
                    unmatched.update(keys)
                    missing = "".join(f"no {k!r}; " for k in ("chosen", "rejected") if k not in record)
                    raise _BadRow("missing_field", f"{missing}keys {keys[:20]} match no preference format")
                fmt, parse = detected, _PARSERS[detected]
            pairs.append(parse(record, _Row(path, folder, where, number)))
        except _BadRow as bad:
            skips.record(where, str(bad))
            skipped.append(SkippedRow(where, bad.reason, bad.detail))
    if parse is None:
        if unmatched:
            raise DataError(
                f"{path}: not a preference format read here; found keys {sorted(unmatched)[:20]}; expected "
                "question/chosen/rejected (mpm jsonl, RLAIF-V parquet), text (RLHF-V parquet), "
                "conversations or messages or instruction + chosen/rejected (LLaMA-Factory), "
                "or prompt/chosen/rejected (TRL)"
            )
        raise DataError(
            f"{path}: holds no preference records" + (f" ({len(skipped)} unreadable rows)" if skipped else "")
        )
    result = PreferenceSet(path, fmt, pairs, skipped)
    logger.info("%s", result.summary())
    return result


def _json_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, number, record or _BadRow) for each line of a .jsonl, or each item of a .json list."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path} line {number}", number, json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    yield f"{path} line {number}", number, _BadRow("bad_json", str(exc))
        return
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc}); a file of one object per line should be named .jsonl"
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of preference records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path} item {i}", i, record


def _parquet_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    row = 0
    try:
        for batch in table.iter_batches(batch_size=64):  # RLAIF-V's files hold GBs of images: a batch at a time
            for record in batch.to_pylist():
                yield f"{path} row {row}", row, record
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable after row {row} ({exc})") from None


def _detect(path: Path, record: dict) -> str | None:
    """The format whose keys `record` has, or None when it matches none."""
    keys = set(record)
    answers = {"chosen", "rejected"} <= keys
    if "text" in keys and "chosen" not in keys:
        return "rlhfv"
    if answers and keys & {"conversations", "messages", "instruction"}:
        return "llamafactory"
    if answers and "prompt" in keys:
        return "trl"
    if answers and "question" in keys:
        return "rlaifv" if path.suffix == ".parquet" else "mpm"
    return None


# ---------------------------------------------------------------------------------------------------------------
# One record of each format -> PreferencePair (or _BadRow)


@dataclass
class _Row:
    path: Path
    folder: Path
    where: str
    number: int

    def default_id(self) -> str:
        return f"{self.path.stem}-{self.number}"


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise _BadRow("missing_field", f"no {key!r}")
    if not isinstance(value, str):
        raise _BadRow("bad_field", f"{key!r} should be text, got {type(value).__name__}")
    return value


def _pair(
    row: _Row, pair_id: Any, image: Any, question: str, chosen: str, rejected: str, lang: Any, extra: dict
) -> PreferencePair:
    """The checks every format shares: placeholders out, nothing empty, a real preference, a usable image."""
    question = IMAGE_MARKER.sub(" ", question).strip()
    for name, value in (("question", question), ("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise _BadRow("empty", f"{name!r} is empty")
    if chosen.strip() == rejected.strip():
        raise _BadRow("identical", "chosen and rejected are the same text")
    return PreferencePair(
        id=str(pair_id) if pair_id is not None else row.default_id(),
        image=_image(image, row),
        question=question,
        chosen=chosen,
        rejected=rejected,
        lang=lang if isinstance(lang, str) else None,
        extra=extra,
        source=row.where,
        row=row.number,
    )


def _image(value: Any, row: _Row) -> Path | bytes | None:
    """A path (checked to exist), bytes (checked to open) or None, from any image value the formats use."""
    if isinstance(value, list):  # LLaMA-Factory / TRL `images`
        if len(value) > 1:
            raise _BadRow("multi_image", f"{len(value)} images; a preference pair holds one")
        value = value[0] if value else None
    if isinstance(value, dict):  # a `datasets` Image struct: bytes when embedded, else a path
        value = value.get("bytes") or value.get("path")
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as im:
                im.verify()  # header and structure, without decoding the pixels
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise _BadRow("bad_image", f"image bytes cannot be opened ({exc})") from None
        return bytes(value)
    if isinstance(value, str) and value:
        file = row.folder / value  # an absolute value stays as it is
        if not file.is_file():
            raise _BadRow("missing_image", f"{file} does not exist")
        return file
    raise _BadRow("bad_field", f"image should be a path or bytes, got {value!r:.60}")


def _extra(record: dict, used: set[str]) -> dict:
    return {k: v for k, v in record.items() if k not in used}


def _parse_flat(record: dict, row: _Row) -> PreferencePair:
    """mpm jsonl and RLAIF-V parquet: the fields are the columns."""
    question, chosen, rejected = (_text(record, k) for k in ("question", "chosen", "rejected"))
    pair_id = record.get("id", record.get("idx"))
    used = {"id", "image", "question", "chosen", "rejected", "lang"} | ({"idx"} if "id" not in record else set())
    return _pair(
        row, pair_id, record.get("image"), question, chosen, rejected, record.get("lang"), _extra(record, used)
    )


def _parse_rlhfv(record: dict, row: _Row) -> PreferencePair:
    """RLHF-V: question/chosen/rejected inside the `text` JSON string (later with `logps`, kept in extra)."""
    raw = record.get("text")
    if raw is None:
        raise _BadRow("missing_field", "no 'text'")
    try:
        text = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRow("bad_json", f"'text' is not JSON ({exc})") from None
    if not isinstance(text, dict):
        raise _BadRow("bad_json", f"'text' should hold a JSON object, got {type(text).__name__}")
    question, chosen, rejected = (_text(text, k) for k in ("question", "chosen", "rejected"))
    extra = _extra(record, {"image", "text", "idx", "lang"}) | _extra(text, {"question", "chosen", "rejected"})
    return _pair(row, record.get("idx"), record.get("image"), question, chosen, rejected, record.get("lang"), extra)


def _message_text(message: Any, role_key: str, text_key: str) -> tuple[str, Any]:
    """(role, text) of a sharegpt turn, role/content message, or TRL message with content parts."""
    if not isinstance(message, dict) or text_key not in message:
        raise _BadRow("bad_field", f"a turn should be an object with {text_key!r}, got {message!r:.60}")
    content = message[text_key]
    if isinstance(content, list):  # TRL content parts: text parts joined, image parts dropped
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not all(isinstance(p, str) for p in parts):
            raise _BadRow("bad_field", f"a text part without text: {content!r:.60}")
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise _BadRow("bad_field", f"turn {text_key!r} should be text, got {type(content).__name__}")
    return message.get(role_key), content


def _one_question(turns: Any, key: str) -> tuple[str, str | None]:
    """(question, system prompt) of a prompt given as turns: exactly one user turn, optionally after a system one."""
    if not isinstance(turns, list) or not turns:
        raise _BadRow("bad_field", f"{key!r} should be a non-empty list of turns")
    role_key, text_key = ("from", "value") if isinstance(turns[0], dict) and "from" in turns[0] else ("role", "content")
    texts = [_message_text(t, role_key, text_key) for t in turns]
    system = [text for role, text in texts if role in _SYSTEM_ROLES]
    rest = [(role, text) for role, text in texts if role not in _SYSTEM_ROLES]
    if len(rest) > 1:
        raise _BadRow("multi_turn", f"{key!r} has {len(rest)} turns; a preference pair holds one question")
    if not rest or rest[0][0] not in _USER_ROLES:
        raise _BadRow("bad_field", f"{key!r} should end with a user turn, got roles {[r for r, _ in texts]}")
    return rest[0][1], "\n".join(system) if system else None


def _answer(record: dict, key: str) -> str:
    """chosen / rejected: a string, one turn ({"from","value"} / {"role","content"}), or a list of one message."""
    value = record.get(key)
    if value is None:
        raise _BadRow("missing_field", f"no {key!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1:
            raise _BadRow("multi_turn", f"{key!r} has {len(value)} messages; expected one answer")
        value = value[0]
    if isinstance(value, dict):
        return _message_text(value, *(("from", "value") if "value" in value else ("role", "content")))[1]
    raise _BadRow("bad_field", f"{key!r} should be text or a message, got {type(value).__name__}")


def _parse_llamafactory(record: dict, row: _Row) -> PreferencePair:
    """LLaMA-Factory ranking data: sharegpt turns (`conversations` / `messages`) or alpaca `instruction`+`input`."""
    system = record.get("system")
    if "instruction" in record and "conversations" not in record and "messages" not in record:
        question = _text(record, "instruction")
        extra_input = record.get("input")
        if isinstance(extra_input, str) and extra_input.strip():
            question = f"{question}\n{extra_input}"
        used = {"instruction", "input"}
    else:
        key = "conversations" if "conversations" in record else "messages"
        if record.get(key) is None:
            raise _BadRow("missing_field", "no 'conversations' or 'messages'")
        question, turn_system = _one_question(record[key], key)
        system = system or turn_system
        used = {key}
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    image = record.get("images", record.get("image"))
    extra = _extra(record, used | {"id", "chosen", "rejected", "images", "image", "lang", "system"})
    if system:
        extra["system"] = system
    return _pair(row, record.get("id"), image, question, chosen, rejected, record.get("lang"), extra)


def _parse_trl(record: dict, row: _Row) -> PreferencePair:
    """TRL (vision) DPO: prompt/chosen/rejected as strings or conversational messages; `images` or `image`."""
    prompt = record.get("prompt")
    if prompt is None:
        raise _BadRow("missing_field", "no 'prompt'")
    system = None
    if isinstance(prompt, str):
        question = prompt
    else:
        question, system = _one_question(prompt, "prompt")
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    image = record.get("images", record.get("image"))
    extra = _extra(record, {"id", "prompt", "chosen", "rejected", "images", "image", "lang"})
    if system:
        extra["system"] = system
    return _pair(row, record.get("id"), image, question, chosen, rejected, record.get("lang"), extra)


_PARSERS = {
    "mpm": _parse_flat,
    "rlaifv": _parse_flat,
    "rlhfv": _parse_rlhfv,
    "llamafactory": _parse_llamafactory,
    "trl": _parse_trl,
}


# ---------------------------------------------------------------------------------------------------------------
# Images


def open_image(pair: PreferencePair, max_pixels: int | None = None) -> Image.Image:
    """The pair's image as the models see it (upright RGB, `mpm.core.images`), decoded now.

    Raises:
        DataError: the pair has no image; MissingImageError / ImageError (DataErrors) naming the pair and the file
            when the image is gone or cannot be decoded.
    """
    if pair.image is None:
        raise DataError(f"preference pair {pair.id!r} ({pair.source}) has no image")
    if not isinstance(pair.image, (bytes, bytearray)):
        return open_image_file(pair.image, max_pixels)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    what = f"the image of preference pair {pair.id!r} ({pair.source})"
    try:
        with Image.open(io.BytesIO(pair.image)) as im:
            if limit and im.width * im.height > limit:
                raise ImageError(
                    f"{what} has {im.width * im.height} pixels, over the limit of {limit} (a decompression-bomb guard)"
                )
            return upright_rgb(im)
    except ImageError as exc:
        if what in str(exc):
            raise
        raise ImageError(f"{what} cannot be decoded: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{what} cannot be decoded: {exc}") from None
