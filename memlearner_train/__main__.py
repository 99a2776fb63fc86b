"""``python -m memlearner_train`` (what ``torchrun`` launches): the ``memlearner-train`` command."""

import sys

from .cli import main

sys.exit(main())
