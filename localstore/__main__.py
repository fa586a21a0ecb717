"""Run the localstore command as ``python -m localstore``."""

import sys

from .cli import main

sys.exit(main())
