"""The bottom layer: what every other package shares, importing nothing of ours above it.

- `config_lib`: config files, overrides, path fields, a stage's image sizes, path flags.
- `partitioning`: the device mesh and the one table of logical axis rules.
- `distributed`: when and how a job becomes multi-process; barriers.
- `fileio`: local and gs:// paths through the same calls; atomic writes with retries.
- `checkpoints`: Orbax checkpoints of a workdir, verified before older ones are pruned.
- `images`: PNG files and image grids.
"""
