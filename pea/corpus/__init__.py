"""The corpus stages: the synthetic corpus and its loopback server, acquire (img2dataset), filter (DuckDB)."""
