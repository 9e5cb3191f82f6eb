"""The command runners: ``train``, ``cifar``, ``demo``, ``info`` (and the GAN's).

A runner turns a command line or a config into objects and runs them: it may import ``data_prep`` and
``eval`` (to build datasets and verifiers) and the library. The library (models, heads, MHE, engine,
config, the face Trainer) never imports a runner, ``data_prep`` or ``eval`` (``tests/test_layering.py``).
Each runner module provides ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` for
``sphereface_plus.cli``.
"""
