"""nvf's library: one module per stage on top of the shared core in `stages.core`.

Every stage is called the same way, `run(ctx, cfg)` (`stages.core.contract`): ``ctx`` says on what
(work tree, dataset, captures, shard, device, overwrite, named paths), ``cfg`` how (the stage's
Config). Nothing here depends on the command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nvf")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0.dev0"
