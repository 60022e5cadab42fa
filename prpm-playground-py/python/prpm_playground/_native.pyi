"""Type stubs of the compiled module (prpm-playground-py/src). Keep in step with it: the tests
check that every public name here exists there and the other way round."""

import datetime
import os
from decimal import Decimal
from types import TracebackType
from typing import Any, Mapping, Optional, Sequence, Union

# An exact USD amount: Decimal, int or decimal string (never a float).
Money = Union[Decimal, int, str]
# A time: an aware datetime (any zone), a naive one (UTC), a date (midnight UTC), or ISO 8601.
Time = Union[datetime.datetime, datetime.date, str]

class PlaygroundError(Exception):
    code: str

class InsufficientCredits(PlaygroundError):
    needed: int
    available: int

class RateLimited(PlaygroundError):
    limit: int
    retry_after_ms: int

class Throttled(PlaygroundError):
    reason: str

class CostLimitExceeded(Throttled):
    limit_usd: Decimal
    spent_usd: Decimal
    held_usd: Decimal
    requested_usd: Decimal

class NotFound(PlaygroundError): ...
class Conflict(PlaygroundError): ...

class InvalidInput(PlaygroundError):
    field: str

class RequestTooLarge(InvalidInput):
    tokens: int
    cap_tokens: int

class Backend(PlaygroundError): ...
class ReadOnly(PlaygroundError): ...

class Table:
    """Record batches of one schema, exported through the Arrow PyCapsule interface."""

    @property
    def num_rows(self) -> int: ...
    @property
    def column_names(self) -> list[str]: ...
    def __len__(self) -> int: ...
    def __arrow_c_stream__(self, requested_schema: Optional[object] = None) -> object: ...
    def __arrow_c_schema__(self) -> object: ...
    def to_pyarrow(self) -> Any: ...
    def to_pandas(self) -> Any: ...
    def to_polars(self) -> Any: ...

class Quote:
    @property
    def tokens(self) -> int: ...
    @property
    def credits(self) -> int: ...
    @property
    def cost_usd(self) -> Decimal: ...

class Estimate:
    @property
    def model(self) -> str: ...
    @property
    def worst_case(self) -> Quote: ...
    @property
    def expected(self) -> Quote: ...
    @property
    def expensive(self) -> bool: ...

class Balance:
    @property
    def account(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def monthly(self) -> int: ...
    @property
    def rollover(self) -> int: ...
    @property
    def purchased(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def available(self) -> int: ...
    @property
    def open_holds(self) -> int: ...
    @property
    def plan_monthly_credits(self) -> Optional[int]: ...
    @property
    def plan_active(self) -> Optional[bool]: ...
    @property
    def period_end(self) -> Optional[datetime.datetime]: ...
    @property
    def next_expiry(self) -> Optional[tuple[int, datetime.datetime]]: ...

class Summary:
    @property
    def total_monthly_revenue_usd(self) -> Decimal: ...
    @property
    def total_monthly_cost_usd(self) -> Decimal: ...
    @property
    def overall_margin_pct(self) -> Optional[Decimal]: ...
    @property
    def active_users(self) -> int: ...
    @property
    def throttled_users(self) -> int: ...
    @property
    def high_risk_users(self) -> int: ...
    @property
    def users(self) -> int: ...
    @property
    def margin_below_70(self) -> bool: ...
    @property
    def throttled_over_5pct(self) -> bool: ...

class VerifyReport:
    @property
    def accounts(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def discrepancies(self) -> list[tuple[str, str, int, int]]: ...
    @property
    def clean(self) -> bool: ...
    def __bool__(self) -> bool: ...

class Receipt:
    @property
    def effect(self) -> str: ...
    @property
    def replayed(self) -> bool: ...
    @property
    def entry(self) -> Optional[int]: ...
    @property
    def hold(self) -> Optional[int]: ...
    @property
    def deadline(self) -> Optional[datetime.datetime]: ...
    @property
    def charged(self) -> int: ...
    @property
    def throttled(self) -> bool: ...
    @property
    def monthly(self) -> int: ...
    @property
    def rollover(self) -> int: ...
    @property
    def purchased(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def available(self) -> int: ...

class Simulation:
    @property
    def months(self) -> int: ...
    @property
    def revenue_usd(self) -> Decimal: ...
    @property
    def cost_usd(self) -> Decimal: ...
    @property
    def margin_pct(self) -> Optional[Decimal]: ...
    @property
    def users(self) -> int: ...
    @property
    def paying_users(self) -> int: ...
    @property
    def credits(self) -> int: ...
    @property
    def admitted(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def refused_cost_usd(self) -> Decimal: ...
    @property
    def refused_by(self) -> dict[str, int]: ...
    @property
    def throttled_users(self) -> list[str]: ...
    def by_tier(self) -> Table: ...
    def by_user(self) -> Table: ...

class Store:
    def __init__(
        self,
        target: Union[str, os.PathLike[str]],
        *,
        writable: bool = False,
        now: Optional[Time] = None,
        prices: Optional[Union[str, os.PathLike[str]]] = None,
    ) -> None: ...
    @property
    def writable(self) -> bool: ...
    @property
    def backend(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Store": ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    def now(self) -> datetime.datetime: ...
    def set_now(self, now: Time) -> None: ...
    # Functions
    def balance(self, account: str) -> Balance: ...
    def summary(self) -> Summary: ...
    def verify(self) -> VerifyReport: ...
    # Writes (a store opened with writable=True)
    def create_account(self, account: str, kind: str = "user", *, key: Optional[str] = None) -> Receipt: ...
    def grant(
        self,
        account: str,
        credits: int,
        *,
        bucket: str = "purchased",
        source: str = "admin",
        reference: str = "",
        expires_at: Optional[Time] = None,
        key: Optional[str] = None,
    ) -> Receipt: ...
    def hold(
        self,
        account: str,
        credits: int,
        *,
        cost_usd: Optional[Money] = None,
        ttl_secs: int = 600,
        reference: str = "",
        key: Optional[str] = None,
    ) -> Receipt: ...
    def settle(
        self,
        hold: int,
        credits: Optional[int] = None,
        *,
        model: Optional[str] = None,
        operation: str = "playground_run",
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: Optional[Money] = None,
        key: Optional[str] = None,
    ) -> Receipt: ...
    def release(self, hold: int, *, key: Optional[str] = None) -> Receipt: ...
    def spend(
        self,
        account: str,
        credits: Optional[int] = None,
        *,
        model: Optional[str] = None,
        operation: str = "playground_run",
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: Optional[Money] = None,
        reference: str = "",
        key: Optional[str] = None,
    ) -> Receipt: ...
    def meter(
        self,
        account: str,
        *,
        model: str,
        operation: str = "ai_operation",
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: Optional[Money] = None,
        reference: str = "",
        key: Optional[str] = None,
    ) -> Receipt: ...
    def set_plan(
        self,
        account: str,
        monthly_credits: Optional[int],
        period_end: Optional[Time] = None,
        *,
        anchor_day: Optional[int] = None,
        key: Optional[str] = None,
    ) -> Receipt: ...
    def set_cost_profile(self, account: str, *, org_member: bool = False, tier: Optional[str] = None, key: Optional[str] = None) -> Receipt: ...
    def record_run(
        self,
        account: str,
        *,
        model: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        credits: int = 0,
        cost_usd: Optional[Money] = None,
        latency_ms: int = 0,
        outcome: str = "completed",
        error: Optional[str] = None,
        hold: Optional[int] = None,
        package: Optional[str] = None,
        with_prompt: bool = True,
        at: Optional[Time] = None,
        run_id: Optional[str] = None,
    ) -> str: ...
    def throttle(self, account: str, *, by: str, why: str, key: Optional[str] = None) -> Receipt: ...
    def unthrottle(self, account: str, *, by: str, why: str, key: Optional[str] = None) -> Receipt: ...
    # Tables
    def usage(
        self, *, start: Optional[Time] = None, end: Optional[Time] = None, account: Optional[str] = None, model: Optional[str] = None
    ) -> Table: ...
    def runs(
        self, *, start: Optional[Time] = None, end: Optional[Time] = None, account: Optional[str] = None, model: Optional[str] = None
    ) -> Table: ...
    def transactions(
        self,
        *,
        start: Optional[Time] = None,
        end: Optional[Time] = None,
        account: Optional[str] = None,
        kinds: Optional[Sequence[str]] = None,
    ) -> Table: ...
    def daily(self, *, start: Time, end: Time, account: Optional[str] = None, model: Optional[str] = None) -> Table: ...
    def users(self, *, account: Optional[str] = None, tier: Optional[str] = None) -> Table: ...
    def purchases(self, *, start: Optional[Time] = None, end: Optional[Time] = None, account: Optional[str] = None) -> Table: ...
    def tiers(self) -> Table: ...
    # What-if pricing
    def simulate(
        self,
        *,
        start: Time,
        end: Time,
        tiers: Optional[Mapping[str, Mapping[str, Any]]] = None,
        prices: Optional[Mapping[str, Mapping[str, Any]]] = None,
        multipliers: Optional[Mapping[str, int]] = None,
        tokens_per_credit: Optional[int] = None,
        request_cap_tokens: Optional[int] = None,
    ) -> Simulation: ...

class TestCluster:
    """A throw-away PostgreSQL cluster for tests (None without PostgreSQL installed)."""

    @staticmethod
    def start() -> Optional["TestCluster"]: ...
    def create_database(self) -> str: ...

def estimate(
    model: str,
    input_tokens: int,
    max_output_tokens: Optional[int] = None,
    expected_output_tokens: Optional[int] = None,
    *,
    request_cap_tokens: Optional[int] = None,
    prices: Optional[Union[str, os.PathLike[str]]] = None,
) -> Estimate: ...
def price(
    model: str,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    *,
    prices: Optional[Union[str, os.PathLike[str]]] = None,
) -> Quote: ...
