"""What every stage stands on: outputs published whole (atomic), secrets masked (redact), progress lines,
Prefect results as plain JSON (results), which network addresses a source may name (addresses), and the lake's
content keys with the DuckDB connection that computes them (keys)."""
