"""hpc-reid: a distributed HPC training toolkit for person re-identification."""

__version__ = "0.1.0"
