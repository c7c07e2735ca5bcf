"""The rollup tables: kept up to date at ingest, read for whole-run figures, series and
windows."""
