"""cProfile every process of a benchmark subject (active only with STREAMER_BENCH_PROFILE).

``bench/run.py --profile`` puts this directory first on ``PYTHONPATH``, so every Python
process of the collector's tree (the supervisor and its spawned workers and writers)
imports it at start-up, profiles its main thread, and writes
``$STREAMER_BENCH_PROFILE/<process name>-<pid>.pstats`` when it exits. Spawned
``multiprocessing`` children skip ``atexit``, so for them the dump is registered as a
multiprocessing finalizer once the child has bootstrapped.
"""

import os

_DIR = os.environ.get("STREAMER_BENCH_PROFILE")

if _DIR:
    import atexit
    import cProfile

    _PROFILE = cProfile.Profile()
    _DONE = []

    def _dump() -> None:
        if _DONE:
            return
        _DONE.append(True)
        _PROFILE.disable()
        try:
            import multiprocessing

            name = multiprocessing.current_process().name
        except Exception:
            name = "process"
        _PROFILE.dump_stats(os.path.join(_DIR, f"{name}-{os.getpid()}.pstats"))

    atexit.register(_dump)
    try:
        from multiprocessing import util

        def _in_child(_profile: object) -> None:
            util.Finalize(None, _dump, exitpriority=100)

        util.register_after_fork(_PROFILE, _in_child)
    except Exception:  # profiling is best effort; never break the subject
        pass
    _PROFILE.enable()
