"""OpenTelemetry metrics for keylock: ``KeyedLock(observer=OTelObserver())``.

Needs the optional ``opentelemetry-api`` package (``pip install 'python-keylock[otel]'``); keylock
itself never imports it. Every instrument carries one attribute, ``keylock.prefix`` (the part of
the key before its first ``:``), so label cardinality stays bounded however many keys there are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .observe import Observer

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter

__all__ = ["OTelObserver"]


class OTelObserver(Observer):
    """Feeds keylock events to OpenTelemetry instruments (histograms in seconds, counters).

    Instruments: ``keylock.acquire.wait`` and ``keylock.hold`` (histograms, s),
    ``keylock.acquired``, ``keylock.handoffs``, ``keylock.timeouts``, ``keylock.leases.lost``,
    ``keylock.leases.renewed``, ``keylock.superseded``, ``keylock.coalesced`` (counters).
    """

    def __init__(self, meter: Meter | None = None) -> None:
        try:
            from opentelemetry import metrics
        except ImportError as exc:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                "keylock.otel needs opentelemetry-api: pip install 'python-keylock[otel]'"
            ) from exc
        meter = meter if meter is not None else metrics.get_meter("keylock")
        self._wait = meter.create_histogram(
            "keylock.acquire.wait", unit="s", description="time to acquire a lease"
        )
        self._hold = meter.create_histogram(
            "keylock.hold", unit="s", description="time a lease was held"
        )
        self._acquired = meter.create_counter("keylock.acquired", description="leases granted")
        self._handoffs = meter.create_counter(
            "keylock.handoffs", description="leases granted after queueing"
        )
        self._timeouts = meter.create_counter("keylock.timeouts", description="LockTimeouts")
        self._lost = meter.create_counter("keylock.leases.lost", description="leases lost")
        self._renewed = meter.create_counter(
            "keylock.leases.renewed", description="background renewals"
        )
        self._superseded = meter.create_counter(
            "keylock.superseded", description="stale_guard calls dropped"
        )
        self._coalesced = meter.create_counter(
            "keylock.coalesced", description="SingleFlight callers that shared a run"
        )

    def acquired(self, prefix: str, waited: float, *, contended: bool | None) -> None:
        attributes = {"keylock.prefix": prefix}
        self._wait.record(waited, attributes)
        self._acquired.add(1, attributes)
        if contended:
            self._handoffs.add(1, attributes)

    def released(self, prefix: str, held: float) -> None:
        self._hold.record(held, {"keylock.prefix": prefix})

    def timed_out(self, prefix: str, waited: float) -> None:
        self._timeouts.add(1, {"keylock.prefix": prefix})

    def lost(self, prefix: str) -> None:
        self._lost.add(1, {"keylock.prefix": prefix})

    def renewed(self, prefix: str) -> None:
        self._renewed.add(1, {"keylock.prefix": prefix})

    def superseded(self, prefix: str) -> None:
        self._superseded.add(1, {"keylock.prefix": prefix})

    def coalesced(self, prefix: str) -> None:
        self._coalesced.add(1, {"keylock.prefix": prefix})
