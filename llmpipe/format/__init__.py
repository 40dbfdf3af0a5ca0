"""The archive container: stream header, blocks, end record (FORMAT.md is the spec)."""
