"""``python -m hpc_reid.cli ...``: the form torchrun, srun and the deepspeed launcher start."""

import sys

from hpc_reid.cli import main

sys.exit(main())
