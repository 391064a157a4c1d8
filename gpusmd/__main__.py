"""``python -m gpusmd``: the ``gpusmd`` command, also from a checkout that is not
installed (``PYTHONPATH=. python -m gpusmd ...``)."""
import sys

from .cli import main

sys.exit(main())
