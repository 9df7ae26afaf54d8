"""Input pipeline (placeholder while being written)."""
