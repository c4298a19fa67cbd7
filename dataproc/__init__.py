"""dataproc: image-text pairs -> filtered webdataset shards, the shard reader for trainers, language id.

Imports none of the project's other packages (mpm, t2i and unimm_chat import it).
"""

from dataproc.shards import Pair, iter_pairs

__all__ = ["Pair", "iter_pairs"]
