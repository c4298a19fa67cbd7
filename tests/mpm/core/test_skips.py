import logging

from mpm.core.skips import SkipLog


def test_skips_are_counted_exactly_and_logged_sparingly(caplog):
    log = SkipLog(logging.getLogger("test.skips"), "sample", first=3, every=100)
    with caplog.at_level(logging.WARNING, logger="test.skips"):
        for i in range(1000):
            log.record(f"{i:09d}", "OSError: truncated" if i % 2 else "ValueError: no image field")
    assert log.count == 1000
    assert log.reasons == {"OSError": 500, "ValueError": 500}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 + 10  # the first three, then one at each of 100, 200, ..., 1000
    assert lines[0] == "skipping sample 000000000: ValueError: no image field"
    assert "later skips are logged every 100" in lines[2]
    assert lines[3].startswith("skipped 100 samples so far (most common: ")
