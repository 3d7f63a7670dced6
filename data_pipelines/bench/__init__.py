"""Benchmarks of the data side (`python -m data_pipelines bench {pii,scrub,loader,dedup}`); each
prints one JSON object as its last line."""
