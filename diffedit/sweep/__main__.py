"""``python -m diffedit.sweep`` and ``torchrun -m diffedit.sweep``."""
import sys

from .cli import main

sys.exit(main())
