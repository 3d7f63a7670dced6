"""Corpus processing: the bias and privacy scrub, tokenizer training, pretokenization and the
streaming training loader. Light to import; heavy libraries load inside the commands."""
