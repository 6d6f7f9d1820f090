"""The pipeline stages as dramatiq actors, and the edges they drive (engine, gzip, S3)."""
