"""Hyperparameter search: Ax's Bayesian optimisation over real training runs, on Ray Tune.

``space`` reads and validates search spaces (``configs/search/*.yaml``), ``searcher`` wraps
``ax.Client`` as a Ray Tune searcher, ``runner`` runs (and resumes) a search, ``report`` writes its
results table, best config and plots. The command is ``hpc-reid tune``; see README.md.
"""
