"""nvf's library: one module per stage on top of the shared core in `stages.core`.

Import a stage and call its `run(...)`; nothing here depends on the command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nvf")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0.dev0"
