"""The training loop (`train.py`) and what only it needs: state, the step, metrics, MFU."""
