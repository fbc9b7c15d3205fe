"""The settings of one simulator run (:class:`SimConfig`)."""

from __future__ import annotations

import msgspec

from .faults import FaultPlan

__all__ = ["SimConfig"]


class SimConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything that shapes a simulator run. Defaults follow Binance's documented limits.

    Market: ``seed`` fixes the content of every stream; ``start_time_ms`` switches to a
    virtual clock (tick ``i`` happens at ``start_time_ms + i * tick_ms``) so times are
    deterministic too; ``history_s`` pre-generates that much market before serving, so REST
    history (aggTrades, klines) exists from the start. ``*_non_trading`` symbols are listed
    in exchangeInfo with the given status and never trade.
    """

    seed: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    spot_symbols: list[str] = msgspec.field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    usdm_symbols: list[str] = msgspec.field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    spot_non_trading: dict[str, str] = msgspec.field(default_factory=lambda: {"LUNAUSDT": "BREAK"})
    usdm_non_trading: dict[str, str] = msgspec.field(
        default_factory=lambda: {"DEADUSDT": "SETTLING"}
    )
    tick_ms: int = 100
    trade_probability: float = 0.5
    book_levels: int = 200
    start_time_ms: int | None = None
    history_s: float = 0.0
    # REST limits
    weight_limit_spot: int = 6000
    weight_limit_usdm: int = 2400
    weight_window_s: float = 60.0
    ban_after_429s: int = 3
    ban_s: float = 120.0
    # WebSocket limits (None = the market's Binance default)
    ping_interval_s: float | None = None
    pong_timeout_s: float | None = None
    incoming_limit: int | None = None
    max_connection_age_s: float = 86_400.0
    max_streams: int = 1024
    max_frame_bytes: int = 1 << 16
    write_buffer_limit: int = 64 << 20
    kline_push_ms: int | None = None
    shutdown_grace_s: float = 1.0
    faults: FaultPlan = msgspec.field(default_factory=FaultPlan)
    # Other sources
    replay: str | None = None
    replay_speed: float = 1.0
    data_dir: str | None = None
    high_rate: int = 0
    high_rate_symbols: int = 100

    def __post_init__(self) -> None:
        checks = [
            (self.tick_ms >= 1, "tick_ms must be >= 1"),
            (0.0 <= self.trade_probability <= 1.0, "trade_probability must be in [0, 1]"),
            (self.book_levels >= 1, "book_levels must be >= 1"),
            (self.history_s >= 0, "history_s must be >= 0"),
            (self.weight_window_s > 0, "weight_window_s must be > 0"),
            (self.max_streams >= 1, "max_streams must be >= 1"),
            (self.max_connection_age_s > 0, "max_connection_age_s must be > 0"),
            (self.replay_speed >= 0, "replay_speed must be >= 0 (0 = as fast as possible)"),
            (self.high_rate >= 0, "high_rate must be >= 0"),
            (1 <= self.high_rate_symbols <= 10_000, "high_rate_symbols must be in 1..10000"),
            (not (self.replay and self.high_rate), "replay and high_rate are exclusive"),
        ]
        for value in (self.ping_interval_s, self.pong_timeout_s):
            checks.append((value is None or value > 0, "ping/pong times must be > 0"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message}")
