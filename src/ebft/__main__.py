"""``python -m ebft ...`` (and ``torchrun --nproc-per-node N -m ebft run ...``): the ``ebft`` command."""
import sys

from .cli import main

sys.exit(main())
