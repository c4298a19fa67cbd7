import gzip
import io
import json
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataproc.sharder import readers
from dataproc.sharder.config import ShardConfig
from dataproc.sharder.readers import (
    DatasetImage,
    TarMember,
    load_hf_dataset,
    read_rows,
    read_source_bytes,
    resolve_input,
)
from mpm.core.config import load_config
from mpm.core.errors import ConfigError
from tests.conftest import image_bytes


def rows_of(path, **flags):
    cfg = load_config(ShardConfig, None, {"input.path": str(path), **{f"input.{k}": v for k, v in flags.items()}}).input
    fmt, files = resolve_input(cfg)
    return fmt, list(read_rows(cfg, fmt, files))


def test_parquet_csv_tsv_jsonl_and_gz_read_the_same_rows(tmp_path):
    records = [
        {"URL": "http://a/1.jpg", "TEXT": "a red car", "similarity": 0.31},
        {"URL": "http://a/2.jpg", "TEXT": "一只猫", "similarity": 0.29},
        {"URL": "http://a/3.jpg", "TEXT": None, "similarity": None},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    csv = "URL,TEXT,similarity\nhttp://a/1.jpg,a red car,0.31\nhttp://a/2.jpg,一只猫,0.29\nhttp://a/3.jpg,,\n"
    (tmp_path / "in.csv").write_text(csv, encoding="utf-8")
    (tmp_path / "in.tsv").write_text(csv.replace(",", "\t"), encoding="utf-8")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (tmp_path / "in.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with gzip.open(tmp_path / "in.csv.gz", "wt", encoding="utf-8") as f:
        f.write(csv)
    for name, fmt in [
        ("in.parquet", "parquet"),
        ("in.csv", "csv"),
        ("in.tsv", "tsv"),
        ("in.jsonl", "jsonl"),
        ("in.jsonl.gz", "jsonl"),
        ("in.csv.gz", "csv"),
    ]:
        got_fmt, rows = rows_of(
            tmp_path / name, url_col="URL", caption_col="TEXT", save_additional_columns=["similarity"]
        )
        assert got_fmt == fmt
        assert [r.url for r in rows] == ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"], name
        assert [r.caption for r in rows][:2] == ["a red car", "一只猫"], name
        assert rows[2].caption in (None, ""), name
        assert [r.extra["similarity"] for r in rows][:2] == pytest.approx([0.31, 0.29]), name
        assert all(r.error is None for r in rows), name


def test_missing_column_names_the_column_and_the_columns_found(tmp_path):
    pq.write_table(pa.table({"URL": ["x"], "TEXT": ["y"]}), tmp_path / "in.parquet")
    with pytest.raises(ConfigError, match=r"no column 'url'; columns found: \['URL', 'TEXT'\]. Set --url-col"):
        rows_of(tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text('{"url": "a.jpg", "text": "hi"}\n')
    with pytest.raises(ConfigError, match=r"no column 'caption'; columns found: \['url', 'text'\]. Set --caption-col"):
        rows_of(tmp_path / "in.jsonl")


def test_non_utf8_and_broken_rows_become_failed_rows(tmp_path):
    (tmp_path / "in.csv").write_bytes(
        b"url,caption\nhttp://a/1.jpg,caf\xe9 au lait\nhttp://a/2.jpg,fine caption\n,no url\n"
    )
    _, rows = rows_of(tmp_path / "in.csv")
    assert "column 'caption' is not valid UTF-8 (byte 0xe9 at position 3)" in rows[0].error
    assert rows[0].caption == "caf\ufffd au lait" and rows[0].url == "http://a/1.jpg"
    assert rows[1].error is None
    assert "column 'url' is empty" in rows[2].error
    (tmp_path / "in.jsonl").write_bytes(
        b'{"url": "http://a/1.jpg", "caption": "ok"}\n'
        b'{"url": "http://a/2.jpg", "caption": "caf\xe9"}\n'
        b"{broken json\n"
        b"\n"
        b"[1, 2]\n"
        b'{"url": "http://a/5.jpg", "caption": "a dog", "score": "high"}\n'
    )
    _, rows = rows_of(tmp_path / "in.jsonl")
    assert len(rows) == 5  # the blank line is not a row
    assert rows[0].error is None
    assert "line 2: not valid UTF-8" in rows[1].error and rows[1].url == "http://a/2.jpg"
    assert "line 3: not valid JSON" in rows[2].error
    assert "expected a JSON object" in rows[3].error
    assert rows[4].error is None


def test_saved_column_with_mixed_types_fails_the_odd_row(tmp_path):
    lines = [{"url": f"http://a/{i}.jpg", "caption": "a dog", "score": v} for i, v in enumerate([0.5, 1, "high", None])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, rows = rows_of(tmp_path / "in.jsonl", save_additional_columns=["score"])
    assert [r.error for r in rows[:2]] == [None, None]  # int and float mix
    assert "column 'score' holds str but earlier rows hold float" in rows[2].error
    assert rows[3].error is None


def test_relative_paths_resolve_against_the_input_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "in.jsonl").write_text(
        '{"url": "img/a.jpg", "caption": "x"}\n{"url": "/abs/b.jpg", "caption": "y"}\n'
    )
    _, rows = rows_of(tmp_path / "sub" / "in.jsonl")
    assert rows[0].url == str(tmp_path / "sub" / "img" / "a.jpg") and rows[1].url == "/abs/b.jpg"


def test_image_folder_with_txt_and_json_sidecars(tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(image_bytes())
    (folder / "a.txt").write_text("A red square.\n", encoding="utf-8")
    (folder / "nested" / "b.png").write_bytes(image_bytes(fmt="PNG"))
    (folder / "nested" / "b.json").write_text(json.dumps({"caption": "Un carré rouge.", "source": "me"}))
    (folder / "c.webp").write_bytes(image_bytes(fmt="WEBP"))  # no caption at all
    (folder / "d.jpg").write_bytes(image_bytes())
    (folder / "d.json").write_text("{not json")
    fmt, rows = rows_of(folder, save_additional_columns=["source"])
    assert fmt == "folder"
    assert [r.url for r in rows] == [str(folder / n) for n in ["a.jpg", "c.webp", "d.jpg", "nested/b.png"]]
    assert rows[0].caption == "A red square." and rows[0].extra == {"source": None}
    assert rows[1].caption is None and rows[1].error is None  # no caption: filtered later as empty
    assert "d.json: unreadable" in rows[2].error
    assert rows[3].caption == "Un carré rouge." and rows[3].extra == {"source": "me"}


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_as_input(tmp_path):
    jpg = image_bytes()
    write_tar(
        tmp_path / "in-00000.tar",
        [
            ("s1.jpg", jpg),
            ("s1.txt", b"A red square"),
            ("s1.json", json.dumps({"url": "http://origin/1.jpg", "similarity": 0.3}).encode()),
            ("s2.png", image_bytes(fmt="PNG")),
            ("s2.json", json.dumps({"caption": "from json"}).encode()),
            ("s3.txt", b"caption without image"),
        ],
    )
    write_tar(tmp_path / "in-00001.tar", [("t1.jpg", jpg), ("t1.txt", b"caf\xe9")])
    fmt, rows = rows_of(str(tmp_path / "in-{00000..00001}.tar"), save_additional_columns=["similarity"])
    assert fmt == "webdataset" and len(rows) == 4
    assert (
        rows[0].url == "http://origin/1.jpg"
        and rows[0].caption == "A red square"
        and rows[0].extra == {"similarity": 0.3}
    )
    assert isinstance(rows[0].source, TarMember) and read_source_bytes(rows[0].source, {}) == jpg
    beyond_the_end = TarMember(rows[0].source.tar_path, rows[0].source.offset, 10**6)  # the tar was cut short
    with pytest.raises(EOFError, match="the tar ends .* bytes into a member of 1000000 bytes"):
        read_source_bytes(beyond_the_end, {})
    assert rows[1].caption == "from json" and rows[1].url.endswith("in-00000.tar#s2")
    assert "no image member" in rows[2].error
    assert "not valid UTF-8" in rows[3].error
    assert rows_of(tmp_path)[0] == "webdataset"  # a folder of tars


def test_huggingface_dataset_saved_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": image_bytes(), "path": None}, {"bytes": image_bytes(fmt="PNG"), "path": None}],
            "caption": ["a", "b"],
        },
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    fmt, rows = rows_of(tmp_path / "ds")
    assert fmt == "hf" and [r.caption for r in rows] == ["a", "b"]
    assert all(r.error is None for r in rows)
    assert isinstance(rows[1].source, DatasetImage)
    assert read_source_bytes(rows[1].source, {}) == image_bytes(fmt="PNG")
    with pytest.raises(ConfigError, match="splits \\['train'\\], not 'test'"):
        rows_of(tmp_path / "ds", split="test")


def test_unknown_input_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        rows_of(tmp_path / "missing.parquet")
    (tmp_path / "list.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="cannot tell its format"):
        rows_of(tmp_path / "list.xlsx")


def test_a_saved_dataset_is_opened_once_per_process_from_many_fetch_threads(tmp_path, monkeypatch):
    # The fetch threads of a worker share its cache of opened datasets. datasets' load_from_disk is not thread-safe
    # (its progress bar deletes a tqdm class lock another thread is using): opening the dataset from every thread at
    # once failed some samples with "AttributeError: 'tqdm' object has no attribute '_lock'".
    datasets = pytest.importorskip("datasets")
    images = [image_bytes(colour=(10 * i, 0, 0)) for i in range(16)]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "caption": ["x"] * 16},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=8)
    opened = []

    def slow_load(path, split):  # a real load, slowed down so every thread asks for the dataset while it loads
        opened.append(path)
        time.sleep(0.1)
        return load_hf_dataset(path, split)

    monkeypatch.setattr(readers, "load_hf_dataset", slow_load)
    cache: dict = {}
    start = threading.Barrier(16)

    def read(row: int) -> bytes:
        start.wait()
        return read_source_bytes(DatasetImage(str(tmp_path / "ds"), None, row, "image"), cache)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(read, range(16)))
    assert got == images
    assert opened == [str(tmp_path / "ds")]
