"""Cascade sampling: stages stitched from workdirs (`cascade`), sampled into an outdir (`outdir`)."""
