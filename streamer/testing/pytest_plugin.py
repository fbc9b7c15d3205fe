"""Opt-in pytest plugin: ``pytest_plugins = ["streamer.testing.pytest_plugin"]``.

Fixtures:

* ``binance_sim``: a :class:`~streamer.testing.sim.SimServer` started in a background
  thread (seed 1, spot and USD-M ``BTCUSDT``/``ETHUSDT``), stopped after the test. Override
  its :class:`~streamer.testing.sim.SimConfig` per test with
  ``@pytest.mark.binance_sim(seed=7, spot_symbols=["SOLUSDT"], ...)``.
* ``binance_sim_factory``: ``make(**config) -> SimServer`` for tests that need several
  servers or build the config at run time; every server made is stopped after the test.

The simulator is imported lazily, so loading this plugin costs nothing until used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .sim import SimServer

__all__ = ["binance_sim", "binance_sim_factory"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "binance_sim(**config): SimConfig fields for the binance_sim fixture of this test",
    )


@pytest.fixture
def binance_sim_factory() -> Iterator[Callable[..., SimServer]]:
    """Start simulators on demand: ``make(seed=3, spot_symbols=[...])``."""
    from .sim import SimConfig, SimServer

    started: list[SimServer] = []

    def make(**config: Any) -> SimServer:
        config.setdefault("seed", 1)
        sim = SimServer(SimConfig(**config)).start_in_thread()
        started.append(sim)
        return sim

    try:
        yield make
    finally:
        for sim in started:
            sim.stop()


@pytest.fixture
def binance_sim(
    request: pytest.FixtureRequest, binance_sim_factory: Callable[..., SimServer]
) -> SimServer:
    """A running simulator (``sim.rest_url``, ``sim.ws_url``, ``sim.faults``, ``sim.truth``)."""
    marker = request.node.get_closest_marker("binance_sim")
    return binance_sim_factory(**(dict(marker.kwargs) if marker else {}))
