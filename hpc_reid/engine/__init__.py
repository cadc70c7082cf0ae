"""Training engine: the loop, strategies (DDP, DeepSpeed), checkpoints, logging hooks."""
