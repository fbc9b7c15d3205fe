"""Binance REST access: one shared request-weight budget, pacing, and polite retries.

Every REST call of an adapter goes through one :class:`RestClient`, so snapshot requests,
trade and kline backfills and exchangeInfo all queue behind the same budget:

* a token bucket refilled at ``limit * safety / 60`` weight per second (bursts are capped
  at ``burst`` weight), so hundreds of snapshot requests after a reconnect are spread out
  instead of fired at once;
* priorities: waiting requests are served most urgent first (``URGENT`` gap fills, which
  live output waits on, before ``NORMAL`` book snapshots), in arrival order within one
  priority, and ``NORMAL`` requests leave room in each minute window for the ``URGENT``
  weight still expected in it (at the rate seen in this or the previous window, at least
  the share ``reserve`` of the ceiling, at most all but one burst), plus ``reserve`` of
  the burst, so trade fills never queue behind a post-reconnect snapshot burst;
* the server's own count, ``X-MBX-USED-WEIGHT-1M`` (which includes other processes on the
  same IP), read on every response: when it reaches ``limit * safety`` no call is sent until
  the next minute window;
* 429 and 418 block the whole host until ``Retry-After`` has passed (exponential backoff
  when the header is absent); 403 (WAF) and 5xx back off exponentially; timeouts and
  connection errors are retried the same way. Other 4xx answers are not retried.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import anyio
import httpx

from streamer import Counters, RateLimitedLog

from .decode import decode_rest_error


class RestError(OSError):
    """A REST call failed for good (a non-retryable 4xx, or retries exhausted).

    It is an ``OSError`` so that callers treating network trouble generically (the CLI's
    ``streamer symbols``) report it as such.

    ``status`` is the HTTP status (0 for a transport failure); ``code`` is Binance's error
    code from the body when there was one.
    """

    def __init__(self, message: str, status: int = 0, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


#: Request priorities (lower is served first).
URGENT = 0  # gap fills: written output waits on them
NORMAL = 1  # book snapshots, exchangeInfo


class WeightBudget:
    """Request-weight accounting for one host, shared by every call of an adapter.

    ``limit`` is the exchange's REQUEST_WEIGHT per minute; the budget never plans past
    ``limit * safety``. ``reserve`` is the least share of that ceiling (and of the burst)
    kept free for ``URGENT`` requests (more when they used more lately). ``clock``
    returns wall-clock seconds (Binance's minute windows are calendar minutes); ``sleep``
    is awaited for every wait, which tests replace.
    """

    def __init__(
        self,
        limit: int,
        *,
        safety: float = 0.8,
        burst: int | None = None,
        reserve: float = 0.2,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.safety = safety
        self.reserve = min(max(reserve, 0.0), 0.9)
        self._burst_override = burst
        self.set_limit(limit)
        self._tokens = float(self.burst)
        self._last_refill = clock()
        #: Where the server's minute windows start, in seconds past the calendar minute:
        #: 0 for Binance, learned from the first fall of its count otherwise.
        self._phase = 0.0
        self._window = int(clock() // 60)
        #: Weight used in the current minute: the larger of our own count and the server's.
        self.used = 0
        #: Wall-clock time before which no request may be sent (429/418/403 backoff).
        self.blocked_until = 0.0
        #: The server's last reported count.
        self._server_used = 0
        #: URGENT weight spent in the current and the previous minute window.
        self.urgent_used = 0
        self._urgent_prev = 0
        #: Waiting requests as a heap of (priority, ticket); the head is served next.
        self._queue: list[tuple[int, int]] = []
        self._tickets = itertools.count()
        #: Set (and replaced) whenever the queue head may have changed; made on first use.
        self._changed: anyio.Event | None = None

    def set_limit(self, limit: int) -> None:
        """Change the per-minute limit (e.g. from exchangeInfo ``rateLimits``)."""
        self.limit = max(int(limit), 1)
        self.ceiling = max(int(self.limit * self.safety), 1)
        self.burst = self._burst_override or max(self.ceiling // 5, 1)
        self.rate = self.ceiling / 60.0
        #: Weight per minute and burst tokens that only URGENT requests may use.
        self.reserved_weight = int(self.ceiling * self.reserve)
        self.reserved_tokens = float(int(self.burst * self.reserve))

    @property
    def waiting(self) -> int:
        """Requests waiting for their turn."""
        return len(self._queue)

    async def acquire(self, weight: int, priority: int = NORMAL) -> None:
        """Wait until ``weight`` may be spent without approaching the limit, then spend it.

        More urgent requests (lower ``priority``) go first; equal ones in arrival order.
        """
        weight = min(max(int(weight), 1), self.burst)
        ticket = (priority, next(self._tickets))
        queue = self._queue
        heapq.heappush(queue, ticket)
        if queue[0] == ticket:
            self._notify()  # a less urgent head that is sleeping must make way
        try:
            while True:
                if queue[0] != ticket:
                    await self._change().wait()
                    continue
                now = self._clock()
                wait = self._wait_for(weight, now, priority)
                if wait <= 0:
                    self._tokens -= weight
                    self.used += weight
                    if priority <= URGENT:
                        self.urgent_used += weight
                    return
                await self._sleep_unless_changed(wait)
        finally:
            if queue and queue[0] == ticket:
                heapq.heappop(queue)
            else:
                queue.remove(ticket)
                heapq.heapify(queue)
            self._notify()

    def _change(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _sleep_unless_changed(self, seconds: float) -> None:
        """Sleep ``seconds`` (with the injected sleep) or until the queue head changes."""
        changed = self._change()
        async with anyio.create_task_group() as tg:

            async def sleeper() -> None:
                await self._sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            await changed.wait()
            tg.cancel_scope.cancel()

    def _window_of(self, now: float) -> int:
        return int((now - self._phase) // 60)

    def _roll(self, window: int) -> None:
        """Start the minute ``window``."""
        self._urgent_prev = self.urgent_used if window == self._window + 1 else 0
        self.urgent_used = 0
        self._window = window
        self.used = 0

    def urgent_rate(self, now: float) -> float:
        """URGENT weight per second to keep room for: the rate seen in this window or the
        previous one, and at least the reserved share of the ceiling."""
        elapsed = now - self._window * 60 - self._phase
        current = self.urgent_used * 60 / max(elapsed, 15.0)
        return max(self._urgent_prev, current, self.reserved_weight) / 60.0

    def _wait_for(self, weight: int, now: float, priority: int = NORMAL) -> float:
        if now < self.blocked_until:
            return self.blocked_until - now
        window = self._window_of(now)
        if window != self._window:
            self._roll(window)
        left = (window + 1) * 60 + self._phase - now
        if self.used + weight > self.ceiling:
            return left + 0.05
        urgent = priority <= URGENT
        if not urgent:
            # Leave room for the urgent weight still to come in this window (at least the
            # reserved share; more at the rate fills ran lately, a room that shrinks as
            # the window runs out), but never all of it: a burst's worth per minute stays
            # for NORMAL requests, so books resync even under heavy fills.
            rate = min(self.urgent_rate(now), max(self.ceiling - self.burst, 1) / 60.0)
            room = max(float(self.reserved_weight), rate * left)
            excess = self.used + weight + room - self.ceiling
            if excess > 0:
                if rate * left <= self.reserved_weight:
                    return left + 0.05  # only the next window (or a server reset) helps
                return min(left + 0.05, max(0.05, excess / rate))
        self._tokens = min(self.burst, self._tokens + (now - self._last_refill) * self.rate)
        self._last_refill = now
        need = weight if urgent else min(weight + self.reserved_tokens, self.burst)
        if self._tokens < need:
            return (need - self._tokens) / self.rate
        return 0.0

    def observe_used(self, used: int) -> None:
        """Record the server's ``X-MBX-USED-WEIGHT-1M`` for the current window.

        A count that falls by more than a burst means the server's minute began (its
        clock and ours differ a little, or it counts minutes from elsewhere): its count is
        then the truth, a stop taken on its previous minute's tail is lifted at once, and
        the windows are counted from there on.
        """
        now = self._clock()
        window = self._window_of(now)
        if window != self._window:  # the response belongs to a window we have not seen yet
            self._roll(window)
        if used + self.burst < self._server_used:
            self._phase = now % 60
            self._urgent_prev, self.urgent_used = self.urgent_used, 0
            self._window = self._window_of(now)
            self.used = used
            self._notify()  # a request waiting for the next minute may go now
        else:
            self.used = max(self.used, used)
        self._server_used = used

    def block(self, seconds: float) -> None:
        """Send nothing to this host for ``seconds`` (extends, never shortens, a block)."""
        self.blocked_until = max(self.blocked_until, self._clock() + seconds)


class RestClient:
    """GET requests against one Binance REST host through a :class:`WeightBudget`.

    ``client`` is the ``httpx.AsyncClient`` to use (one per adapter; injected in tests);
    when ``None`` one is created and closed by :meth:`aclose`. ``max_attempts`` bounds the
    retries of one call (429/418 waits do not count as attempts, so a long ban is waited
    out); ``backoff_max`` caps the exponential backoff in seconds.
    """

    def __init__(
        self,
        base_url: str,
        budget: WeightBudget,
        *,
        counters: Counters,
        logger: logging.Logger,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        max_attempts: int = 8,
        backoff_max: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.budget = budget
        self._counters = counters
        self._log = RateLimitedLog(logger, 30.0)
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._own_client:
            await self._client.aclose()

    def _backoff(self, attempt: int, base: float) -> float:
        return min(self.backoff_max, base * 2 ** (attempt - 1)) * (0.5 + self._rng.random() / 2)

    async def get(
        self,
        path: str,
        params: Mapping[str, object],
        weight: int,
        *,
        max_attempts: int | None = None,
        priority: int = NORMAL,
    ) -> bytes:
        """The body of ``GET base_url + path?params`` once it succeeds.

        ``priority`` orders it among the requests waiting for the budget (``URGENT``
        before ``NORMAL``).

        Raises :class:`RestError` for a non-retryable answer or when ``max_attempts``
        (default: the client's) failed attempts have been made.
        """
        attempts_allowed = max_attempts or self.max_attempts
        url = self.base_url + path
        attempt = 0
        bans = 0
        while True:
            await self.budget.acquire(weight, priority)
            self._counters.incr("rest_requests")
            try:
                response = await self._client.get(url, params=params, timeout=self._timeout)
            except httpx.TimeoutException as exc:
                self._counters.incr("rest_timeouts")
                failure = f"timeout: {type(exc).__name__}"
                base = 1.0
            except httpx.TransportError as exc:
                self._counters.incr("rest_transport_errors")
                failure = f"transport error: {type(exc).__name__}: {exc}"
                base = 1.0
            else:
                status = response.status_code
                used = response.headers.get("x-mbx-used-weight-1m")
                if used is not None and used.isdigit():
                    self.budget.observe_used(int(used))
                    self._counters.set("rest_weight_used", int(used))
                if status < 400:
                    return response.content
                if status in (429, 418):
                    self._counters.incr(f"rest_{status}")
                    bans += 1
                    wait = _retry_after(response)
                    if wait is None:
                        wait = min(self.backoff_max * 10, 2.0 * 2 ** (bans - 1))
                    self.budget.block(wait)
                    self._log.warning(
                        f"rest_{status}",
                        "HTTP %d from %s: no requests to this host for %.1f s",
                        status, self.base_url, wait,
                    )  # fmt: skip
                    continue
                if status == 403:
                    self._counters.incr("rest_403")
                    attempt += 1
                    wait = self._backoff(attempt, 5.0)
                    self.budget.block(wait)
                    failure = "HTTP 403 (WAF block)"
                    self._log.warning(
                        "rest_403", "HTTP 403 from %s: backing off %.1f s", self.base_url, wait
                    )
                    if attempt >= attempts_allowed:
                        raise RestError(f"GET {path}: {failure}", 403)
                    continue
                if status >= 500:
                    self._counters.incr("rest_5xx")
                    failure = f"HTTP {status}"
                    base = 1.0
                else:
                    err = decode_rest_error(response.content)
                    detail = f"{err.code} {err.msg}" if err else response.text[:200]
                    self._counters.incr("rest_client_errors")
                    raise RestError(
                        f"GET {path} {dict(params)}: HTTP {status}: {detail}",
                        status,
                        err.code if err else None,
                    )
            attempt += 1
            if attempt >= attempts_allowed:
                raise RestError(f"GET {path}: {failure} (gave up after {attempt} attempts)")
            wait = self._backoff(attempt, base)
            self._counters.incr("rest_retries")
            self._log.warning(
                "rest_retry", "GET %s failed (%s); retrying in %.1f s", path, failure, wait
            )
            await self.budget._sleep(wait)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None
