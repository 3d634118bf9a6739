"""What entry points share: typed config from pipelines.yaml, the common CLI flags, progress bars, HTML pages."""
