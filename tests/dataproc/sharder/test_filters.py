import hashlib
import random

import pytest

from dataproc.sharder.config import ShardConfig
from dataproc.sharder.filters import CaptionFilters, Deduplicator, HammingIndex
from dataproc.sharder.images import Rejected
from mpm.core.config import load_config


def filters(**flags):
    cfg = load_config(ShardConfig, None, {f"filters.{k}": v for k, v in flags.items()}).filters
    return CaptionFilters(cfg)


@pytest.mark.parametrize(
    ("caption", "status"),
    [
        (None, "filtered_empty_caption"),
        ("   ", "filtered_empty_caption"),
        ("ab", "filtered_caption_length"),
        ("IMG_2034.JPG", "filtered_boilerplate"),
        ("DSC 0042 edited", "filtered_boilerplate"),
        ("Click here to enlarge the photo", "filtered_boilerplate"),
        ("untitled", "filtered_boilerplate"),
        ("--- ### ---", "filtered_boilerplate"),
        ("Ein Hund spielt im Schnee neben dem Haus.", "filtered_language"),
        ("一只猫坐在红色的垫子上。", "filtered_language"),
    ],
)
def test_caption_rejections(caption, status):
    with pytest.raises(Rejected) as info:
        filters()(caption)
    assert info.value.status == status


def test_kept_caption_is_tagged_and_limits_apply():
    prediction = filters()("Two dogs playing in the snow near a red house")
    assert prediction.lang == "en" and prediction.score > 0.5
    with pytest.raises(Rejected, match="words"):
        filters(min_caption_words=3)("red car")
    with pytest.raises(Rejected, match="characters"):
        filters(max_caption_chars=10)("Two dogs playing in the snow")
    # an empty language list tags without filtering; several languages can be kept
    assert filters(languages=[])("Ein Hund spielt im Schnee neben dem Haus.").lang == "de"
    assert filters(languages=["en", "zh"])("一只猫坐在红色的垫子上。").lang == "zh"
    with pytest.raises(Rejected, match="score >= 0.99"):
        filters(min_lang_score=0.99)("a photo of a dog")


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
