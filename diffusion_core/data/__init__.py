"""Data: raw readers, validation, the ingest job writing webdataset shards, the shapes dataset.

- ``sources`` (plan and read the raw inputs) through ``safety`` (no symlink followed, no path
  outside its source, a size cap before reading), ``tario`` (tars), ``images`` (checks, decode).
- ``ingest`` (the Ray Data job and its local loop) writes a dataset in the format of ``format``
  (names, the manifest's writer and reader, shard verification), with ``atomic`` writes.

See ``docs/data.md`` for the shard format, the safety rules and the rejection reasons.
"""
