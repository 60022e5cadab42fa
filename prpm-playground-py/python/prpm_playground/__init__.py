"""Cost analysis over a prpm-playground ledger (SQLite or PostgreSQL).

Open a store, read its tables (Arrow streams that pyarrow, pandas and polars take without
copies through Python objects), call its functions, or replay its usage under other prices::

    import prpm_playground as pp

    with pp.Store("ledger.db") as store:            # read-only unless writable=True
        users = store.users().to_pandas()
        print(store.summary())
        what_if = store.simulate(start="2026-03-01", end="2026-04-01",
                                 tiers={"prpm_plus_org": {"monthly_cost_limit": "2.00"}})

Money is ``decimal.Decimal`` (``decimal128`` in the tables), never a float.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from . import _native
from ._native import (
    Backend,
    Balance,
    Conflict,
    CostLimitExceeded,
    Estimate,
    InsufficientCredits,
    InvalidInput,
    NotFound,
    PlaygroundError,
    Quote,
    RateLimited,
    ReadOnly,
    Receipt,
    RequestTooLarge,
    Simulation,
    Store,
    Summary,
    Table,
    Throttled,
    VerifyReport,
    estimate,
    price,
)

__all__ = [
    "Backend",
    "Balance",
    "Conflict",
    "CostLimitExceeded",
    "Estimate",
    "InsufficientCredits",
    "InvalidInput",
    "NotFound",
    "PlaygroundError",
    "Quote",
    "RateLimited",
    "ReadOnly",
    "Receipt",
    "RequestTooLarge",
    "Simulation",
    "Store",
    "Summary",
    "Table",
    "Throttled",
    "VerifyReport",
    "estimate",
    "open",
    "price",
]


def open(  # noqa: A001 - the module's own open, as sqlite3.connect is
    target: Union[str, "os.PathLike[str]"],
    *,
    writable: bool = False,
    now: Optional[_native.Time] = None,  # type: ignore[name-defined]
    prices: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> Store:
    """Opens a store: the same as ``Store(target, ...)``."""
    return Store(target, writable=writable, now=now, prices=prices)
