"""Data sources: each yields :class:`~engine.data.record.SourceRecord` items for ingest."""
