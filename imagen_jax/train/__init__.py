"""The training loop and what it needs: state, partitioning, checkpoints, metrics."""
