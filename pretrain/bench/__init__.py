"""Benchmarks of the trainer: ``trainer`` (`python -m pretrain bench CONFIG`, the real training
step), ``model`` (the bare model step against nanoGPT's) and ``overhead`` (the framework-overhead
proxy at a near-zero-compute shape). Each prints one JSON object as its last line."""
