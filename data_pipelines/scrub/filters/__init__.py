"""Scrub filters, one module per concern.

Each module is usable on its own (tests call them directly) and is orchestrated by
:mod:`data_pipelines.scrub.runner` in this order: normalize -> malformed checks -> language -> quality
-> dedup -> toxicity (+ bias audit of every drop) -> PII redaction of kept documents. Every
module exposes a ``VERSION`` string recorded in manifest.json, so a changed filter changes the
manifest and the config hash tells apart runs that are not comparable.
"""
