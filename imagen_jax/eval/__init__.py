"""Evaluation of sampling outdirs: `shapes` (the shapes judge: prompt adherence, background and
edge measures), `fid` and `inception` (FID against reference statistics), `drawbench` (sampling,
rating pages, tallies). The flags are in imagen_jax/commands/eval.py."""
