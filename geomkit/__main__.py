"""``python -m geomkit run ...``."""

import sys

from geomkit.cli import main

sys.exit(main())
