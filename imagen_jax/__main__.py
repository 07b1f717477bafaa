"""`python -m imagen_jax` is the `imagen-jax` command."""

from imagen_jax import cli

if __name__ == "__main__":
  cli.main()
