"""samora_pl: SAMora (hierarchical self-supervised pre-training for SAM) as a Lightning framework."""

__version__ = "0.1.0"
