"""The on-disk contract of a run directory: file and column schemas, Parquet helpers, the directory's life
(staging, snapshots, the final swap), the DuckDB index and its named SQL, and ``RunStore``, the read-only query layer.
"""
