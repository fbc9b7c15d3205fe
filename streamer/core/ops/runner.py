"""``python -m streamer.core.ops.runner ARGS``: the ``streamer`` CLI, for the daemon to spawn.

The daemon starts the collector with the same interpreter that runs the ``streamer daemon``
command rather than whatever ``streamer`` comes first on ``PATH`` (a virtualenv may not be
activated under systemd or cron).
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``streamer`` command line with this process's arguments."""
    from streamer.cli import main as cli_main

    sys.argv[0] = "streamer"
    cli_main()


if __name__ == "__main__":
    main()
