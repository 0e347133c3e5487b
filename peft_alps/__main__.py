"""``python -m peft_alps ...``: the ``peft-alps`` command line."""

import sys

from .cli import main

sys.exit(main())
