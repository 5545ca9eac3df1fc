"""``python -m vim <command> ...``: the ``vimkit`` command, for environments without the console script on ``PATH``."""

from vim.cli import main

main()
