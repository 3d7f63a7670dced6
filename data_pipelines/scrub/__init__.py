"""The scrub stage: raw corpus -> scrubbed shards + manifest.json + report.

``readers`` turns every input into a stream of records, ``runner`` drives the filters
(``filters/``: normalize, language, quality, dedup, toxicity + bias audit, PII) over them in
phases, and writes the shards, ``manifest`` (the contract with everything downstream) and
``report``. With ``scrub.canaries``, ``planting`` plants random secrets for the memorization audit
and follows every copy; ``canaries`` (their spaces and the registry beside the output) is the one
module ``pretrain`` imports from here. Importing this package loads nothing heavy; the command
imports ``runner``.
"""
