"""Every loss of the framework: segmentation (stage 2), NT-Xent (SimCLR CPT), distillation (stage 1)."""
