"""The nvf command line: a thin Typer shell over `stages`."""
