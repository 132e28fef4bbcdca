"""``python -m dppo`` (and ``torchrun -m dppo ...``): the command line."""

from dppo.cli.main import main

main()
