"""``python -m sphereface_plus`` is the ``sphereface-plus`` console script."""
from sphereface_plus.cli import exit_process, main

exit_process(main())
