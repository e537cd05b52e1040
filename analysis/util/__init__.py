"""Utilities: storage, privacy, metrics, statistics helpers, taxonomy, embeddings, regions (import only the contract layer)."""
