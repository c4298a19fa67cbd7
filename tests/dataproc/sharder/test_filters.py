"""Filter blocks: the built-in ones (today's statuses and messages, in order), blocks defined outside the project
(registered here, used through `filters.extra`, sharded by the real `shard()`), and the deduplicator."""

import hashlib
import json
import random
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import ImageStat

from dataproc.shard_layout import FILTER_STATUSES, completed_shards, format_stats_table
from dataproc.sharder import shard
from dataproc.sharder.config import ShardConfig
from dataproc.sharder.filters import (
    Deduplicator,
    Filter,
    FilterError,
    HammingIndex,
    Rejected,
    Sample,
    apply_filters,
    build_filters,
    register_filter,
)
from mpm.cli import main
from mpm.core.config import load_config
from mpm.core.errors import ConfigError
from tests.conftest import distinct_jpeg, image_bytes


@register_filter
class NoDigitsFilter(Filter):
    """A caption-stage block defined outside the project."""

    name, reason, stage = "no_digits", "digits", "caption"

    def check(self, sample: Sample) -> str | None:
        digits = "".join(c for c in sample.caption if c.isdigit())
        return f"caption has digits {digits!r}" if digits else None


@register_filter
class TooDarkFilter(Filter):
    """An image-stage block with an option: looks at the decoded pixels."""

    name, reason, stage = "too_dark", "too_dark", "image"

    def __init__(self, min_brightness: float = 40, inclusive: bool = False):
        self.min_brightness, self.inclusive = min_brightness, inclusive

    def check(self, sample: Sample) -> str | None:
        mean = ImageStat.Stat(sample.image.convert("L")).mean[0]
        dark = mean <= self.min_brightness if self.inclusive else mean < self.min_brightness
        return f"mean brightness {mean:.0f} < {self.min_brightness}" if dark else None


# The import-path form: spawned worker processes import this module, so they find the classes without the registry.
HERE = "tests.dataproc.sharder.test_filters"


def config(**flags) -> ShardConfig:
    return load_config(ShardConfig, None, {f"filters.{k}": v for k, v in flags.items()})


def caption_stage(**flags):
    blocks = build_filters(config(**flags).filters)

    def run(caption):
        sample = Sample(caption=caption)
        apply_filters(blocks, "caption", sample)
        return sample

    return run


@pytest.mark.parametrize(
    ("caption", "status", "message"),
    [
        (None, "filtered_empty_caption", "caption is null"),
        ("   ", "filtered_empty_caption", "caption is empty"),
        ("ab", "filtered_caption_length", "2 characters, outside filters.min/max_caption_chars [3, 1000]"),
        ("IMG_2034.JPG", "filtered_boilerplate", None),
        ("DSC 0042 edited", "filtered_boilerplate", None),
        ("Click here to enlarge the photo", "filtered_boilerplate", "matches boilerplate pattern 'click (here )?to"),
        ("untitled", "filtered_boilerplate", None),
        ("--- ### ---", "filtered_boilerplate", r"matches boilerplate pattern '^[\\W\\d_]+$'"),
        ("Ein Hund spielt im Schnee neben dem Haus.", "filtered_language", "language de (1.00); wanted ['en'] with"),
        ("一只猫坐在红色的垫子上。", "filtered_language", None),
    ],
)
def test_caption_rejections(caption, status, message):
    with pytest.raises(Rejected) as info:
        caption_stage()(caption)
    assert info.value.status == status
    assert message is None or info.value.message.startswith(message), info.value.message


def test_kept_caption_is_tagged_and_limits_apply():
    tags = caption_stage()("Two dogs playing in the snow near a red house").tags
    assert tags["lang"] == "en" and tags["lang_score"] > 0.5
    with pytest.raises(Rejected, match="words"):
        caption_stage(min_caption_words=3)("red car")
    with pytest.raises(Rejected, match="characters"):
        caption_stage(max_caption_chars=10)("Two dogs playing in the snow")
    # an empty language list tags without filtering; several languages can be kept
    assert caption_stage(languages=[])("Ein Hund spielt im Schnee neben dem Haus.").tags["lang"] == "de"
    assert caption_stage(languages=["en", "zh"])("一只猫坐在红色的垫子上。").tags["lang"] == "zh"
    with pytest.raises(Rejected, match="score >= 0.99"):
        caption_stage(min_lang_score=0.99)("a photo of a dog")


def test_blocks_are_built_in_order_and_settings_that_turn_one_off_leave_it_out():
    def names(**flags):
        return [block.name for block in build_filters(config(**flags).filters)]

    assert names() == ["empty_caption", "caption_length", "boilerplate", "language"]
    assert names(boilerplate_patterns=[], min_image_size=8, max_image_area=10**6) == [
        "empty_caption", "caption_length", "language", "image_size", "image_area",
    ]  # fmt: skip
    extra = [{"name": "too_dark"}, {"name": f"{HERE}:NoDigitsFilter"}]
    assert names(max_aspect_ratio=3.0, extra=extra) == [
        "empty_caption", "caption_length", "boilerplate", "language", "aspect_ratio", "too_dark", "no_digits",
    ]  # fmt: skip
    # every built-in block counts into a status of the contract
    every = build_filters(config(min_image_size=1, max_aspect_ratio=2.0, max_image_area=5).filters)
    assert {block.status for block in every} <= set(FILTER_STATUSES)


def test_header_blocks_see_the_original_size():
    blocks = build_filters(config(min_image_size=30, max_aspect_ratio=3.0, max_image_area=50_000).filters)

    def header(width, height):
        with pytest.raises(Rejected) as info:
            apply_filters(blocks, "header", Sample(caption="x", width=width, height=height))
        return info.value.status, info.value.message

    assert header(40, 20) == ("filtered_image_size", "40x20: min side < filters.min_image_size 30")
    assert header(300, 50) == ("filtered_aspect_ratio", "300x50: aspect 6.00 > filters.max_aspect_ratio 3.0")
    assert header(300, 200) == ("filtered_image_area", "300x200: area 60000 > filters.max_image_area 50000")
    apply_filters(blocks, "header", Sample(caption="x", width=200, height=100))  # kept: nothing raised


def test_extra_filters_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "shard.yaml"
    path.write_text(
        f"filters:\n  extra:\n    - name: too_dark\n      min_brightness: 12.5\n    - name: {HERE}:NoDigitsFilter\n"
    )
    cfg = load_config(ShardConfig, path)
    assert cfg.filters.extra == [{"name": "too_dark", "min_brightness": 12.5}, {"name": f"{HERE}:NoDigitsFilter"}]
    assert build_filters(cfg.filters)[-2].min_brightness == 12.5
    cfg = load_config(ShardConfig, path, overrides=["filters.extra=[{name: no_digits}]"])
    assert cfg.filters.extra == [{"name": "no_digits"}]
    # YAML 1.2 booleans: `off` is a string until the option's type says it is a bool
    path.write_text("filters:\n  extra:\n    - name: too_dark\n      inclusive: off\n      min_brightness: 1e-3\n")
    block = build_filters(load_config(ShardConfig, path).filters)[-1]
    assert block.inclusive is False and block.min_brightness == 0.001
    with pytest.raises(
        ConfigError, match=r"`filters.extra\[0\].inclusive` \(too_dark\) takes true or false, got 'maybe'"
    ):
        load_config(ShardConfig, None, overrides=["filters.extra=[{name: too_dark, inclusive: maybe}]"])


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ([{"name": "no_digit"}], r"`filters.extra\[0\].name` is 'no_digit', which is not a registered filter "
         r"\(registered in this process: \[.*'no_digits'.*\]\); name a filter class of your own by its import path"),
        ([{"name": "tests.dataproc.sharder.nowhere:X"}], "'tests.dataproc.sharder.nowhere' cannot be imported"),
        ([{"name": f"{HERE}:NoSuchFilter"}], f"module {HERE} has no 'NoSuchFilter'"),
        ([{"name": f"{HERE}:config"}], "not a subclass of dataproc.sharder.filters.Filter"),
        ([{"min_brightness": 3}], r"`filters.extra\[0\]` needs a `name`"),
        ([{"name": "too_dark", "min_brightnes": 3}], r"`filters.extra\[0\]` \(too_dark\) has options .*min_brightnes"),
        ([{"name": "no_digits"}, {"name": f"{HERE}:NoDigitsFilter"}], r"`filters.extra\[1\]`.*filtered_digits"),
    ],
)  # fmt: skip
def test_bad_extra_filters_are_config_errors_at_load(extra, error):
    with pytest.raises(ConfigError, match=error):
        config(extra=extra)


class RaisingFilter(Filter):
    name, reason, stage = "raising", "raising", "caption"

    def check(self, sample):
        return str(1 / 0)


class BadTagFilter(Filter):
    name, reason, stage = "bad_tag", "bad_tag", "caption"

    def check(self, sample):
        sample.tags["status"] = "success"


def test_a_filter_bug_is_a_filter_error_not_a_rejection():
    with pytest.raises(FilterError, match="filter RaisingFilter raised ZeroDivisionError"):
        apply_filters([RaisingFilter()], "caption", Sample(caption="x"))
    with pytest.raises(FilterError, match=r"BadTagFilter tagged \['status'\]"):
        apply_filters([BadTagFilter()], "caption", Sample(caption="x"))


CAPTION = "A photo of a colourful pattern on a table"


def test_blocks_from_outside_the_project_shard_count_and_show(tmp_path, web, make_config, capsys):
    dark = image_bytes((64, 48), colour=(12, 12, 12))
    rows = [
        (distinct_jpeg(0), CAPTION, "success"),
        (distinct_jpeg(1), "A photo of 3 cats on a table", "filtered_digits"),
        (dark, CAPTION, "filtered_too_dark"),
        (distinct_jpeg(2), "Ein Foto von 2 Katzen auf einem Tisch im Garten", "filtered_language"),  # built-ins first
        (image_bytes((12, 9), colour=(5, 5, 5)), CAPTION, "filtered_image_size"),  # header stage before image stage
        (distinct_jpeg(3), CAPTION, "success"),
    ]
    lines = [{"url": web.add(f"/{i}.jpg", body=body), "caption": caption} for i, (body, caption, _) in enumerate(rows)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    extra = [{"name": f"{HERE}:NoDigitsFilter"}, {"name": f"{HERE}:TooDarkFilter", "min_brightness": 40}]
    # The web server's thread makes the executor spawn its worker (executors._start_method): a fresh process that
    # does not share this one's registry and finds the classes by their import path.
    assert threading.active_count() > 1
    cfg = make_config(src, output__samples_per_shard=4, filters__min_image_size=16, filters__extra=extra)
    totals = shard(cfg, show_progress=False)
    out = Path(cfg.output.path)

    records = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [r["status"] for r in records] == [status for *_, status in rows]
    assert records[1]["error_message"] == "caption has digits '3'"
    assert records[2]["error_message"] == "mean brightness 12 < 40"
    assert records[2]["lang"] == "en" and records[1]["lang"] == "en"  # tagged by the language block that kept them

    # Every stats file lists the new statuses (zeros included) after the built-in ones; totals and table count them.
    for stats in completed_shards(out).values():
        names = list(stats)
        assert names[names.index("filtered_near_duplicate") + 1 : names.index("start_time")] == [
            "filtered_digits", "filtered_too_dark",
        ]  # fmt: skip
    assert [stats["filtered_too_dark"] for _, stats in sorted(completed_shards(out).items())] == [1, 0]
    saved = json.loads((out / "stats.json").read_text())
    for got in (totals, saved):
        assert got["filtered_digits"] == got["filtered_too_dark"] == 1 and got["successes"] == 2
    table = format_stats_table(totals)
    assert "filtered_digits" in table and "filtered_too_dark" in table
    assert main(["data", "stats", str(out)]) == 0
    assert capsys.readouterr().out.strip() == table

    # filters.extra is an output setting: a resumption that changes it is refused.
    with pytest.raises(ConfigError, match=r"filters.extra: .*--overwrite"):
        shard(make_config(src, output__samples_per_shard=4, filters__min_image_size=16), show_progress=False)


def test_hamming_index_agrees_with_brute_force():
    rng = random.Random(0)
    stored = [rng.getrandbits(64) for _ in range(500)]
    # near copies of some stored hashes, plus random queries
    queries = [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in stored[:100]]
    queries += [rng.getrandbits(64) for _ in range(200)]
    for distance in (0, 3, 6):
        index = HammingIndex(distance)
        assert [index.add(h) for h in stored] == list(range(len(stored)))
        for q in queries:
            expected = any((q ^ h).bit_count() <= distance for h in stored)
            found = index.find(q)
            assert (found is not None) == expected
            if found is not None:
                assert (stored[found] ^ q).bit_count() <= distance


def test_deduplicator_keeps_the_first_copy():
    cfg = load_config(ShardConfig, None, {"filters.near_duplicate_max_distance": 2}).filters
    dedup = Deduplicator(cfg)
    a, b, c = (hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))
    assert dedup.check(a, 0b1111) is None
    dedup.add(a, 0b1111, "000000000")
    dedup.add(c, 2**64 - 1, "000120007")
    same = dedup.check(a, 0)
    assert same.status == "filtered_duplicate" and same.message == "same bytes as 000000000"
    near = dedup.check(b, 0b1100)
    assert near.status == "filtered_near_duplicate" and near.message == "pHash within 2 bits of 000000000"
    assert dedup.check(b, 0b11110000) is None
    assert dedup.check(b, 2**64 - 2).message == "pHash within 1 bits of 000120007"
    off = Deduplicator(
        load_config(
            ShardConfig, None, {"filters.dedup_exact": False, "filters.near_duplicate_max_distance": None}
        ).filters
    )
    off.add(a, 1, "000000001")
    assert off.check(a, 1) is None
