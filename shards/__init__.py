"""The data contract between stages: every on-disk format with its one reader and writer, bucket tables,
reason codes, atomic writes, the training loader.

`shards/` is the base layer: it imports no stage, no model library and no Ray.
"""
