"""The ``streamer sim`` command: run the Binance simulator on a local port.

Importing this module is cheap; the server is imported when the command runs.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer

from streamer import hookimpl

__all__ = ["register_commands", "sim_command"]


def _symbols(text: str) -> list[str]:
    return [s.strip().upper() for s in text.split(",") if s.strip()]


def sim_command(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for REST and WebSocket (0 = any).")] = 9000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic market.")] = 1,
    symbols: Annotated[str, typer.Option(help="Spot symbols, comma-separated.")] = (
        "BTCUSDT,ETHUSDT"
    ),
    usdm_symbols: Annotated[str, typer.Option(help="USD-M symbols, comma-separated.")] = (
        "BTCUSDT,ETHUSDT"
    ),
    tick_ms: Annotated[int, typer.Option(help="Market step in ms.")] = 100,
    history: Annotated[float, typer.Option(help="Seconds of history to pre-generate.")] = 0.0,
    rate: Annotated[
        int, typer.Option(help="High-rate benchmark mode: target messages/s (0 = off).")
    ] = 0,
    rate_symbols: Annotated[int, typer.Option(help="Symbols in high-rate mode.")] = 100,
    replay: Annotated[
        str | None, typer.Option(help="Replay a capture: a name (BINANCE_FUTURES) or a file.")
    ] = None,
    speed: Annotated[float, typer.Option(help="Replay speed factor (0 = flat out).")] = 1.0,
    data_dir: Annotated[str | None, typer.Option(help="Folder of recorded captures.")] = None,
    ping_interval: Annotated[float | None, typer.Option(help="Server ping interval, s.")] = None,
    pong_timeout: Annotated[float | None, typer.Option(help="Pong deadline, s.")] = None,
    max_age: Annotated[float, typer.Option(help="Max connection age, s.")] = 86_400.0,
    weight_limit: Annotated[
        int | None, typer.Option(help="REST weight per minute (both markets).")
    ] = None,
    close_every: Annotated[float, typer.Option(help="Close all connections every S s.")] = 0.0,
    close_after_messages: Annotated[
        int, typer.Option(help="Close each connection after N messages.")
    ] = 0,
    abrupt: Annotated[bool, typer.Option(help="Closes are TCP resets, not close frames.")] = (
        False
    ),
    drop_depth_every: Annotated[int, typer.Option(help="Drop every N-th depth event.")] = 0,
    drop_aggtrade_every: Annotated[int, typer.Option(help="Drop every N-th aggTrade.")] = 0,
    duplicate_every: Annotated[int, typer.Option(help="Send every N-th message twice.")] = 0,
    reorder_every: Annotated[int, typer.Option(help="Swap every N-th message.")] = 0,
    malformed_every: Annotated[int, typer.Option(help="Bad frame before every N-th.")] = 0,
    stall_after: Annotated[float, typer.Option(help="Stall all streams after S s.")] = 0.0,
    stall_for: Annotated[float, typer.Option(help="Length of the stall, s.")] = 30.0,
    rest_429_every: Annotated[int, typer.Option(help="Answer every N-th REST call 429.")] = 0,
    rest_5xx_every: Annotated[int, typer.Option(help="Answer every N-th REST call 503.")] = 0,
    slow_snapshots: Annotated[float, typer.Option(help="Delay depth snapshots by S s.")] = 0.0,
    shutdown_every: Annotated[
        float, typer.Option(help="Send serverShutdown every S s, then disconnect.")
    ] = 0.0,
) -> None:
    """Run a local Binance-protocol simulator (spot + USD-M REST and streams)."""
    try:
        _serve(locals())
    except (ValueError, OSError) as exc:  # bad option, missing capture, port in use
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _serve(o: dict[str, Any]) -> None:
    """Build the config from the command's options ``o`` and run until interrupted."""
    import asyncio

    from .faults import FaultPlan
    from .sim import SimConfig, SimServer

    plan = FaultPlan(
        close_every_s=o["close_every"],
        close_after_messages=o["close_after_messages"],
        abrupt=o["abrupt"],
        drop_depth_every=o["drop_depth_every"],
        drop_aggtrade_every=o["drop_aggtrade_every"],
        duplicate_every=o["duplicate_every"],
        reorder_every=o["reorder_every"],
        malformed_every=o["malformed_every"],
        stall_after_s=o["stall_after"],
        stall_for_s=o["stall_for"],
        rest_429_every=o["rest_429_every"],
        rest_5xx_every=o["rest_5xx_every"],
        slow_snapshot_s=o["slow_snapshots"],
        shutdown_every_s=o["shutdown_every"],
    )
    extra: dict[str, Any] = {}
    if o["weight_limit"] is not None:
        extra = {"weight_limit_spot": o["weight_limit"], "weight_limit_usdm": o["weight_limit"]}
    config = SimConfig(
        seed=o["seed"],
        host=o["host"],
        port=o["port"],
        spot_symbols=_symbols(o["symbols"]),
        usdm_symbols=_symbols(o["usdm_symbols"]),
        tick_ms=o["tick_ms"],
        history_s=o["history"],
        high_rate=o["rate"],
        high_rate_symbols=o["rate_symbols"],
        replay=o["replay"],
        replay_speed=o["speed"],
        data_dir=o["data_dir"],
        ping_interval_s=o["ping_interval"],
        pong_timeout_s=o["pong_timeout"],
        max_connection_age_s=o["max_age"],
        faults=plan,
        **extra,
    )
    server = SimServer(config)
    if o["replay"]:
        mode = f"replay of {o['replay']}"
    elif o["rate"]:
        mode = f"high-rate {o['rate']} msg/s"
    else:
        mode = "synthetic"

    async def _main() -> None:
        await server.start()
        typer.echo(
            f"binance simulator ({mode}) on {server.rest_url} and {server.ws_url} "
            f"(USD-M streams under /public and /market); Ctrl-C to stop",
            err=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await server.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())


@hookimpl
def register_commands(app: typer.Typer) -> None:
    """Add ``streamer sim``."""
    app.command("sim")(sim_command)
