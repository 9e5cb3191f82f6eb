"""``python -m sphereface_plus`` is the ``sphereface-plus`` console script."""
import sys

from sphereface_plus.cli import main

sys.exit(main())
