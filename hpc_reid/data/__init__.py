"""Data sets, the synthetic generator, samplers and loaders."""
