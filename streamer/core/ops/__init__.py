"""Operations: daemon mode, live status, health checks, metrics endpoint and log rotation.

Nothing here is on the data path. Everything reads what the runtime publishes
(``<state_dir>/status.json``) or manages the ``streamer run`` process from outside.
"""
