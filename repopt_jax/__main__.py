"""`python -m repopt_jax`: the command line (see `repopt_jax.cli`)."""

import sys

from repopt_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
