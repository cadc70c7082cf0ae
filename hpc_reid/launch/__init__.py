"""Launching: distributed initialisation from SLURM / torchrun / Ray environments."""
