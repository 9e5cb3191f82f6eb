"""Every ``sphereface-plus`` command, one module each: the only place that parses a command line.

A command module holds ``HELP`` (one line for the top-level help), optionally ``DESCRIPTION`` (its
``--help`` text; the module docstring otherwise), ``add_arguments(parser)`` and ``run(args) -> int`` (the
exit status), and is registered in :data:`sphereface_plus.cli.COMMANDS`. It turns the command line into
objects of the library (``sphereface_plus``), ``data_prep`` and ``eval`` and runs them; the packages below
it hold no argparse and never import this one (``tests/test_layering.py``): the floors are
``sphereface_plus`` (the library) < ``data_prep`` < ``eval`` < ``sphereface_plus.commands``.

Only the module of the command being run is imported, so a command starts fast and an optional
dependency of one command (onnxruntime, faiss) never breaks another. Options that several commands share
(``--precision``, recipe fields as flags) are defined once in :mod:`~sphereface_plus.commands.options`.
"""
