"""Subcommands of the ``lsoftmax`` command line; each module defines ``register(subparsers)``.

Command modules import their heavy dependencies inside the command function, so that
``lsoftmax --help`` stays fast.
"""
