"""Evaluation of the scrub: labelled PII sets built in code (``pii_synth``: Faker prose and hard
negatives; ``pii_heldout``: libphonenumber example numbers in many layouts) and their scoring
(``pii_eval``)."""
