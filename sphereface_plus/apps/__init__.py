"""Old entry points, kept so that existing scripts keep working: ``python -m sphereface_plus.apps.train``
(and ``torchrun -m sphereface_plus.apps.train``) is ``python -m sphereface_plus train``, with a one-line
notice. Every command lives in :mod:`sphereface_plus.commands`."""
