"""`python -m mmdistill <verb> ...`: the same command as the `mmdistill` console script."""

from mmdistill.cli import main

main()
