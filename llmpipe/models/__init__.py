"""Model definitions and the on-disk model cache."""
