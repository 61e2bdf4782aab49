"""Exports of a finished fine-tune for other tools: `samora bundle` writes a MONAI bundle (bundle.py)."""
