"""Curation: URL list -> curated high-resolution image shards with scores and a manifest."""
