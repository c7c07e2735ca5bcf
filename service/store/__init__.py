"""Every SQL statement: engine and sessions (db.py), tables (models.py), migrations
(migrate.py), ingest (ingest.py, bulk.py), reads (queries.py) and the rollups (rollups/)."""
