"""``python -m streamer``: the same as the ``streamer`` command."""

from streamer.cli import main

# The guard matters: spawned children re-import this module as ``__mp_main__``.
if __name__ == "__main__":
    main()
