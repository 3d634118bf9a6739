"""The data contract between stages: formats, bucket tables, reason codes, config, atomic writes.

`shards/` is the base layer: it imports no other stage.
"""
