"""`mpm data shard`: English image-text pairs into filtered, deduplicated, resumable webdataset shards."""

from dataproc.sharder.config import ShardConfig
from dataproc.sharder.run import ShardRunError, shard

__all__ = ["ShardConfig", "ShardRunError", "shard"]
