"""The training loaders behind :mod:`data_pipelines.loaders`.

``sources`` opens scrubbed outputs (the privacy gate) and reads fixed row ranges; ``stream`` is
the streaming loader (tokenize, pack, exact and elastic resume), ``pretokenize`` writes token
memmap shards and ``pretokenized`` reads them; ``common`` holds what both loaders share,
``packing`` and ``prefetch`` the batch assembly. The trainer imports none of these directly.
"""
