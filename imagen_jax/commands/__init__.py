"""The `imagen-jax` subcommands: one thin module each (flags in, one library call out).

A command module defines its own flags, declares the shared ones it takes (`shared_flags`), and
its `main(argv)` checks them and calls the library with plain arguments: `train.train` trains a
stage, `text.encode_job` encodes captions, `sample.outdir` samples into an outdir, `eval`
scores, `demo` runs the whole shapes demo. Nothing below this package reads a flag.
"""
