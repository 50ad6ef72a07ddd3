"""`python -m textmill <verb> ...`: the same entry point as the `textmill` script, for launchers that run a module.

torchrun starts workers this way: `torchrun --standalone --nproc-per-node N -m textmill train MODEL --set
training.backend=pt` (docs/training.md, "Several GPUs and machines").
"""

import sys

from textmill.cli import main

if __name__ == "__main__":
    sys.exit(main())
