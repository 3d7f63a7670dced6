"""Pretraining framework for decoder-only Transformers (trainer package).

Importing this package is cheap: torch, deepspeed and datasets load only inside the commands
that need them, so configuration errors are reported before any heavy import.
"""

__version__ = "0.1.0"
