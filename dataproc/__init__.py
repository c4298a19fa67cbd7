"""dataproc: image-text pairs -> filtered webdataset shards, the shard reader for trainers, language id.

Imports none of the project's other packages (mpm, t2i and unimm_chat import it). Import what you need from its
modules (`from dataproc.shards import iter_pairs`); this file stays empty so that importing one module does not
import torch and webdataset into every sharder worker.
"""
