"""The tables, read by pyarrow, pandas and polars through the Arrow PyCapsule interface, on both
backends: every column's type (decimal money, UTC timestamps), the rows, and the filters."""

import datetime
import sqlite3
from decimal import Decimal

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import prpm_playground as pp
from conftest import at

MONEY = pa.decimal128(20, 6)
TS = pa.timestamp("ms", tz="UTC")
SONNET, OPUS = "claude-sonnet-4-5", "claude-opus-4-5"


def build(s):
    """Three users over two days across a month's end (March 31st and April 1st, 2026)."""
    s.set_now(at(2026, 3, 31, 10))
    s.create_account("ann", key="c-ann")
    s.create_account("ben", key="c-ben")
    s.create_account("cat", key="c-cat")
    s.set_plan("ben", 200, at(2026, 4, 30), key="plan-ben")  # PRPM+ Individual, $6
    s.set_cost_profile("cat", tier="unlimited", key="tier-cat")
    s.grant("ann", 100, key="g-ann")
    h = s.hold("ann", 5, cost_usd="0.02", key="h1")
    s.settle(h.hold, 2, model=SONNET, input_tokens=2_000, output_tokens=1_000, cost_usd="0.0125", key="s1")
    s.meter("ben", model=OPUS, input_tokens=1_000, output_tokens=200, cost_usd="0.01", key="m1")
    s.record_run("ann", model=SONNET, input_tokens=2_000, output_tokens=1_000, credits=2, cost_usd="0.0125", latency_ms=900, hold=h.hold, package="pkg")
    s.set_now(at(2026, 4, 1, 9))
    s.spend("ann", 1, model=SONNET, input_tokens=300, output_tokens=100, cost_usd="0.002", key="p1")
    s.meter("cat", model=SONNET, input_tokens=10, output_tokens=10, cost_usd="1.5", key="m2")
    s.record_run("ben", model=OPUS, input_tokens=1_000, output_tokens=200, cost_usd="0.01", latency_ms=1500, outcome="failed", error="provider_unavailable")
    s.throttle("ben", by="ops", why="review", key="t-ben")


def readers(table):
    """The same table through each library: pyarrow.table, pandas and polars."""
    arrow = pa.table(table)
    frame = pd.DataFrame.from_arrow(table) if hasattr(pd.DataFrame, "from_arrow") else table.to_pandas()
    frame_pl = pl.DataFrame(table)
    # polars.from_arrow takes any Arrow stream as one struct Series (polars' choice): unnested,
    # the same frame.
    assert pl.from_arrow(table).struct.unnest().equals(frame_pl)
    return arrow, frame, frame_pl


def test_usage(open_store):
    s = open_store()
    build(s)
    t = s.usage()
    arrow, frame, polars = readers(t)
    assert arrow.schema.field("cost_usd").type == MONEY and arrow.schema.field("at").type == TS
    assert arrow.column("account").to_pylist() == ["ann", "ben", "ann", "cat"]
    assert arrow.column("cost_usd").to_pylist() == [Decimal("0.0125"), Decimal("0.01"), Decimal("0.002"), Decimal("1.5")]
    assert arrow.column("at").to_pylist()[0] == at(2026, 3, 31, 10)
    assert arrow.column("credits").to_pylist() == [2, 0, 1, 0]
    assert arrow.column("total_tokens").to_pylist() == [3_000, 1_200, 400, 20]
    assert (t.num_rows, len(t)) == (4, 4)
    assert t.column_names == arrow.column_names
    # pandas: money stays exact (decimal.Decimal), times are UTC.
    assert list(frame["cost_usd"]) == [Decimal("0.0125"), Decimal("0.01"), Decimal("0.002"), Decimal("1.5")]
    assert sum(frame["cost_usd"]) == Decimal("1.5245")
    assert str(frame["at"].dt.tz) == "UTC"
    # polars: a decimal column with scale 6, and the same sum.
    assert polars["cost_usd"].dtype == pl.Decimal(20, 6)
    assert polars["cost_usd"].sum() == Decimal("1.5245")
    assert polars.filter(pl.col("account") == "ann")["credits"].sum() == 3

    # Filters: time (start inclusive, end exclusive), account, model.
    april = s.usage(start=datetime.date(2026, 4, 1), end="2026-04-02").to_pyarrow()
    assert april.column("account").to_pylist() == ["ann", "cat"]
    assert s.usage(start=at(2026, 4, 1, 9), end=at(2026, 4, 1, 9)).num_rows == 0
    assert s.usage(account="ann").to_pyarrow().column("entry").to_pylist() == [arrow.column("entry")[0].as_py(), arrow.column("entry")[2].as_py()]
    assert s.usage(model=OPUS).to_pyarrow().column("account").to_pylist() == ["ben"]
    assert s.usage(account="nobody").num_rows == 0
    # An empty table still has its schema.
    empty = pa.table(s.usage(model="gpt-2"))
    assert empty.num_rows == 0 and empty.schema == arrow.schema


def test_runs_transactions_daily_users(open_store):
    s = open_store()
    build(s)
    runs = pa.table(s.runs())
    assert runs.column("account").to_pylist() == ["ann", "ben"]
    assert runs.column("outcome").to_pylist() == ["completed", "failed"]
    assert runs.column("error").to_pylist() == [None, "provider_unavailable"]
    assert runs.column("latency_ms").to_pylist() == [900, 1500]
    assert runs.column("cost_usd").to_pylist() == [Decimal("0.0125"), Decimal("0.01")]
    assert runs.schema.field("cost_usd").type == MONEY
    assert pa.table(s.runs(model=OPUS, start="2026-04-01")).num_rows == 1
    assert pa.table(s.runs(end="2026-04-01")).column("package").to_pylist() == ["pkg"]

    log = pa.table(s.transactions())
    # The log adds up to every balance.
    for account in ("ann", "ben", "cat"):
        mine = log.filter(pa.compute.equal(log.column("account"), account))
        assert sum(mine.column("total").to_pylist()) == s.balance(account).total
        assert mine.column("balance_after").to_pylist()[-1] == s.balance(account).total
    kinds = pa.table(s.transactions(account="ann", kinds=["settle", "spend"])).column("kind").to_pylist()
    assert kinds == ["settle", "spend"]
    grants = pl.DataFrame(s.transactions(kinds=["grant"]))
    assert grants.filter(pl.col("source") == "plan")["account"].to_list() == ["ben"]
    assert pa.table(s.transactions(start="2026-04-01")).column("kind").to_pylist() == ["spend", "meter", "throttle"]

    # Daily: cost per account and day, and ben's plan fee on the day his period started.
    daily = pl.DataFrame(s.daily(start="2026-03-01", end="2026-05-01")).sort(["day", "account"])
    assert daily.select(["day", "account", "runs", "cost_usd", "plan_revenue_usd"]).rows() == [
        (datetime.date(2026, 3, 31), "ann", 1, Decimal("0.0125"), Decimal("0")),
        (datetime.date(2026, 3, 31), "ben", 1, Decimal("0.01"), Decimal("6")),
        (datetime.date(2026, 4, 1), "ann", 1, Decimal("0.002"), Decimal("0")),
        (datetime.date(2026, 4, 1), "cat", 1, Decimal("1.5"), Decimal("0")),
    ]
    assert daily.schema["day"] == pl.Date and daily.schema["cost_usd"] == pl.Decimal(20, 6)
    only_opus = pa.table(s.daily(start="2026-03-01", end="2026-05-01", model=OPUS))
    assert only_opus.column("plan_revenue_usd").to_pylist() == [Decimal("0")]
    with pytest.raises(pp.InvalidInput):
        s.daily(start="2025-01-01", end="2026-05-01")

    users = pa.table(s.users()).to_pylist()
    by = {u["account"]: u for u in users}
    assert [u["account"] for u in users] == ["ann", "ben", "cat"]
    assert (by["ann"]["tier"], by["ben"]["tier"], by["cat"]["tier"]) == ("free", "prpm_plus_individual", "unlimited")
    assert by["ben"]["monthly_revenue_usd"] == Decimal("6") and by["ann"]["monthly_revenue_usd"] == 0
    # April: the March costs no longer count; cat's $1.50 does.
    assert (by["ann"]["month_cost_usd"], by["cat"]["month_cost_usd"], by["ben"]["month_cost_usd"]) == (Decimal("0.002"), Decimal("1.5"), 0)
    assert by["ben"]["margin_usd"] == Decimal("6")
    assert (by["ann"]["monthly_cost_limit_usd"], by["ann"]["daily_cost_limit_usd"], by["ann"]["hourly_request_limit"]) == (Decimal("0.5"), Decimal("0.1"), 10)
    assert (by["cat"]["daily_cost_limit_usd"], by["cat"]["hourly_request_limit"]) == (None, None)
    assert (by["ben"]["throttled"], by["ben"]["throttle_reason"], by["ben"]["throttled_since"]) == (True, "admin", at(2026, 4, 1, 9))
    assert (by["ben"]["risk"], by["ann"]["risk"], by["ann"]["throttled"]) == ("high_risk", "low", False)
    assert (by["ann"]["purchased_credits"], by["ann"]["available_credits"]) == (102, 102)
    assert (by["ben"]["monthly_credits"], by["ben"]["plan_monthly_credits"], by["ben"]["period_end"]) == (200, 200, at(2026, 4, 30))
    assert pa.table(s.users(account="ben")).num_rows == 1
    assert pa.table(s.users(tier="free")).column("account").to_pylist() == ["ann"]
    with pytest.raises(pp.NotFound):
        s.users(account="nobody")

    tiers = pa.table(s.tiers()).to_pylist()
    assert [t["tier"] for t in tiers] == ["free", "prpm_plus_individual", "prpm_plus_org", "unlimited"]
    assert tiers[2]["monthly_cost_limit_usd"] == Decimal("2.5") and tiers[2]["monthly_revenue_usd"] == Decimal("3")


def test_purchases(tmp_path):
    # Purchases are written by the billing module (Stripe); here a row as it writes them.
    path = tmp_path / "p.db"
    pp.Store(path, writable=True).close()
    db = sqlite3.connect(path)
    cols = "id, account, kind, product, credits, amount_cents, currency, status, credited, refunded_cents, credits_reversed, version, created_ms, updated_ms"
    rows = [
        ("pur_1", "ann", "pack", "small", 100, 500, "usd", "completed", 1, 0, 0, 2, 1_774_000_000_000, 1_774_000_001_000),
        ("pur_2", "ben", "pack", "large", 600, 2000, "usd", "partially_refunded", 1, 500, 150, 3, 1_775_000_000_000, 1_775_000_001_000),
    ]
    db.executemany(f"INSERT INTO purchases ({cols}) VALUES ({', '.join('?' * 14)})", rows)
    db.commit()
    with pp.Store(path) as s:
        t = pa.table(s.purchases())
        assert t.column("id").to_pylist() == ["pur_1", "pur_2"]
        assert t.schema.field("amount_usd").type == pa.decimal128(20, 2)
        assert t.column("amount_usd").to_pylist() == [Decimal("5.00"), Decimal("20.00")]
        assert t.column("refunded_usd").to_pylist() == [Decimal("0"), Decimal("5")]
        assert t.column("created_at").to_pylist()[0] == datetime.datetime.fromtimestamp(1_774_000_000, datetime.timezone.utc)
        assert pa.table(s.purchases(account="ben")).column("product").to_pylist() == ["large"]
        start = datetime.datetime.fromtimestamp(1_774_500_000, datetime.timezone.utc)
        assert pa.table(s.purchases(start=start)).column("id").to_pylist() == ["pur_2"]
        assert pa.table(s.purchases(end=start)).column("id").to_pylist() == ["pur_1"]


def test_the_capsule_interface(open_store):
    s = open_store()
    build(s)
    t = s.usage()
    # Exported twice: each export streams the same batches.
    assert pa.table(t).equals(pa.table(t))
    assert pa.schema(t) == pa.table(t).schema
    reader = pa.RecordBatchReader.from_stream(t)
    assert sum(b.num_rows for b in reader) == 4
    capsule = t.__arrow_c_stream__()
    assert type(capsule).__name__ == "PyCapsule"
    del capsule  # released unconsumed
    assert "cost_usd: Decimal128(20, 6)" in repr(t)
    assert t.to_polars().shape == (4, len(t.column_names))
    assert t.to_pandas().shape == (4, len(t.column_names))
