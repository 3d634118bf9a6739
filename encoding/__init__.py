"""The encode stage: curated shards + captions -> T5 features and VAE latents in bucketed training shards."""
