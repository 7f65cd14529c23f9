"""Data: raw readers, validation, the ingest job writing webdataset shards, the shapes dataset.

See ``docs/data.md`` for the shard format and the rejection reasons.
"""
