"""Binance spot and USD-M futures exchange plugin (registered as ``binance``)."""

from __future__ import annotations

from streamer import hookimpl

from .adapter import BinanceAdapter, BinanceOptions

__all__ = ["BinanceAdapter", "BinanceOptions"]


@hookimpl
def register_exchanges(register):
    """Register the ``binance`` exchange adapter."""
    register("binance", BinanceAdapter)
