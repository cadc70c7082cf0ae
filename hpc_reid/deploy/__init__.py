"""From a trained model to use: a FAISS index of a gallery's features
(:mod:`~hpc_reid.deploy.index`, ``hpc-reid index``) and searching it with query images
(:mod:`~hpc_reid.deploy.search`, ``hpc-reid search``)."""
