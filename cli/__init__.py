"""The ``dppo`` command line: Typer commands that parse options and call one library function each."""
