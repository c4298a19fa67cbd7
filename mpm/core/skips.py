"""Skipped samples: counted exactly, logged sparingly (open_clip's data.py does the same).

A dirty shard can hold thousands of undecodable images; a warning for each would bury a real error. `SkipLog`
logs the first `first` skips in full, then one line every `every` skips with the running count; every skip is
still counted (and logged at DEBUG, for `-v -v` style digging).
"""

from __future__ import annotations

import logging
from collections import Counter


class SkipLog:
    def __init__(self, logger: logging.Logger, what: str = "sample", first: int = 10, every: int = 1000):
        self.logger, self.what, self.first, self.every = logger, what, first, every
        self.count = 0
        self.reasons: Counter = Counter()

    def record(self, key: str, reason: str) -> None:
        """Count one skipped sample (`key` names it: a shard key, a conversation id, a file)."""
        self.count += 1
        self.reasons[reason.split(":")[0]] += 1
        if self.count <= self.first:
            more = f" (later skips are logged every {self.every})" if self.count == self.first else ""
            self.logger.warning("skipping %s %s: %s%s", self.what, key, reason, more)
        elif self.count % self.every == 0:
            common = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common(3))
            self.logger.warning(
                "skipped %d %ss so far (most common: %s); latest %s: %s", self.count, self.what, common, key, reason
            )
        else:
            self.logger.debug("skipping %s %s: %s", self.what, key, reason)
