"""Every function of the module, on both backends."""

import datetime
import sqlite3
from decimal import Decimal

import pytest

import prpm_playground as pp
from conftest import UTC, at


def test_estimate_and_price():
    # Opus: 6,000 in + 4,000 out = 10,000 tokens = 2 credits x 5; $5 x 6,000 + $25 x 4,000 per
    # million = $0.13. Expected output: a quarter of the max (1,000): $0.03 + $0.025.
    e = pp.estimate("claude-opus-4-5", 6_000, 4_000)
    assert (e.model, e.expensive) == ("claude-opus-4-5", True)
    assert (e.worst_case.tokens, e.worst_case.credits, e.worst_case.cost_usd) == (10_000, 10, Decimal("0.13"))
    assert (e.expected.tokens, e.expected.credits, e.expected.cost_usd) == (7_000, 10, Decimal("0.055"))
    assert isinstance(e.worst_case.cost_usd, Decimal)
    e = pp.estimate("claude-sonnet-4-5", 1_000, 1_000, 100)
    assert (e.expected.tokens, e.expected.credits, e.expensive) == (1_100, 1, False)
    # Sonnet: 1,000 in x $3 + 500 out x $15 + 2,000 cache reads x $0.30 + 100 writes x $3.75.
    q = pp.price("claude-sonnet-4-5", 1_000, 500, 2_000, 100)
    assert (q.tokens, q.credits, q.cost_usd) == (3_600, 1, Decimal("0.011475"))
    with pytest.raises(pp.RequestTooLarge) as err:
        pp.estimate("claude-sonnet-4-5", 15_001, request_cap_tokens=15_000)
    assert (err.value.tokens, err.value.cap_tokens, err.value.code) == (15_001, 15_000, "request_too_large")


def test_price_table_file(tmp_path):
    table = tmp_path / "prices.toml"
    table.write_text(
        '[[model]]\nid = "local-llama"\nprovider = "openai_compatible"\ninput = "0"\noutput = "0.5"\n'
        'cache_read = "0"\ncache_write = "0"\nmultiplier = 2\nmax_output_tokens = 8192\n'
    )
    q = pp.price("local-llama", 100, 2_000_000, prices=table)
    assert (q.credits, q.cost_usd) == (401 * 2, Decimal("1"))
    with pytest.raises(pp.InvalidInput) as err:
        pp.price("claude-sonnet-4-5", 1, prices=table)
    assert err.value.code == "unknown_model"


def test_writes_balances_summary_and_verify(open_store):
    s = open_store()
    assert (s.writable, s.closed) == (True, False)
    assert s.now() == at(2026, 3, 1, 12)
    created = s.create_account("alice", key="create-alice")
    assert (created.effect, created.available) == ("account_created", 5)
    assert s.create_account("alice", key="create-alice").replayed, "the same key replays"
    g = s.grant("alice", 100, key="pack-1", reference="small pack")
    assert (g.effect, g.purchased, g.available, g.replayed) == ("granted", 105, 105, False)
    assert g.entry is not None

    h = s.hold("alice", 10, cost_usd=Decimal("0.05"), ttl_secs=300, key="hold-1")
    assert (h.effect, h.held, h.available) == ("held", 10, 95)
    assert h.deadline == at(2026, 3, 1, 12, 5)
    # Settled on the usage: credits and cost priced from the tokens (1,500 tokens = 1 credit;
    # $0.003 + $0.0075).
    st = s.settle(h.hold, model="claude-sonnet-4-5", input_tokens=1_000, output_tokens=500, key="settle-1")
    assert (st.effect, st.hold, st.charged, st.held, st.available) == ("settled", h.hold, 1, 0, 104)

    h2 = s.hold("alice", 3, key="hold-2")
    r = s.release(h2.hold, key="release-2")
    assert (r.effect, r.hold, r.available) == ("released", h2.hold, 104)

    sp = s.spend("alice", 4, model="claude-opus-4-5", input_tokens=100, output_tokens=100, cost_usd="0.01", key="spend-1")
    assert (sp.effect, sp.charged, sp.available) == ("spent", 4, 100)
    sp = s.spend("alice", model="claude-opus-4-5", input_tokens=100, output_tokens=100, key="spend-2")
    assert sp.charged == 5, "priced: 1 credit x 5 for Opus"
    m = s.meter("alice", model="gpt-4o-mini", input_tokens=1_000_000, cost_usd=0, key="meter-1")
    assert (m.effect, m.charged, m.available) == ("metered", 0, 95)

    b = s.balance("alice")
    assert (b.account, b.kind, b.monthly, b.rollover, b.purchased, b.total, b.held, b.available, b.open_holds) == (
        "alice", "user", 0, 0, 95, 95, 0, 95, 0,
    )
    assert (b.plan_monthly_credits, b.plan_active, b.period_end, b.next_expiry) == (None, None, None, None)

    s.create_account("acme", "organisation", key="create-acme")
    assert s.balance("acme").purchased == 200, "a verified organisation's 200 credits"
    plan_end = at(2026, 3, 31)
    s.create_account("bob", key="create-bob")
    p = s.set_plan("bob", 200, plan_end, key="plan-bob")
    assert (p.effect, p.monthly) == ("plan_set", 200)
    assert s.balance("bob").period_end == plan_end
    s.set_cost_profile("bob", org_member=True, key="org-bob")
    t = s.throttle("bob", by="ops", why="review", key="t-bob")
    assert t.effect == "throttled"
    assert s.unthrottle("bob", by="ops", why="done", key="u-bob").effect == "unthrottled"

    run_id = s.record_run("alice", model="claude-sonnet-4-5", input_tokens=10, output_tokens=20, credits=1, latency_ms=321)
    assert len(run_id) == 32
    assert s.record_run("alice", model="claude-sonnet-4-5", run_id=run_id) == run_id, "idempotent by run id"

    summary = s.summary()
    # bob: PRPM+ org member ($3); alice's month: $0.0105 + $0.01 + $0.003 (Opus: 100 in x $5
    # + 100 out x $25 per million) + $0 = $0.0235; margin 2.9765 / 3 = 99.2 %.
    assert summary.total_monthly_revenue_usd == Decimal("3")
    assert summary.total_monthly_cost_usd == Decimal("0.0235")
    assert summary.overall_margin_pct == Decimal("99.2")
    assert (summary.users, summary.active_users, summary.throttled_users) == (3, 2, 0)
    report = s.verify()
    assert report.clean and bool(report) and report.discrepancies == []
    assert (report.accounts, report.entries) == (3, 15)

    # The clock: only a store opened with now= moves.
    s.set_now(datetime.date(2026, 4, 2))
    assert s.now() == at(2026, 4, 2)
    assert s.summary().total_monthly_cost_usd == 0, "a new month"


def test_system_clock_and_context_manager(target):
    with pp.Store(target, writable=True) as s:
        now = s.now()
        assert abs(now - datetime.datetime.now(UTC)) < datetime.timedelta(minutes=1)
        with pytest.raises(pp.InvalidInput):
            s.set_now(now)
        s.create_account("u1")
    assert s.closed
    with pytest.raises(pp.Backend) as err:
        s.balance("u1")
    assert err.value.code == "closed"
    s.close()  # twice: nothing
    with pp.Store(target) as again:
        assert again.balance("u1").purchased == 5, "the write was kept"
        assert repr(again) == f'Store(backend="{again.backend}", writable=False, closed=False)'


def test_read_only_by_default(target):
    with pp.Store(target, writable=True) as s:
        s.create_account("alice")
    with pp.Store(target) as ro:
        assert not ro.writable
        writes = [
            lambda: ro.create_account("bob"),
            lambda: ro.grant("alice", 1),
            lambda: ro.hold("alice", 1),
            lambda: ro.settle(1, 1),
            lambda: ro.release(1),
            lambda: ro.spend("alice", 1),
            lambda: ro.meter("alice", model="claude-sonnet-4-5"),
            lambda: ro.set_plan("alice", None),
            lambda: ro.set_cost_profile("alice"),
            lambda: ro.throttle("alice", by="a", why="b"),
            lambda: ro.unthrottle("alice", by="a", why="b"),
            lambda: ro.record_run("alice", model="claude-sonnet-4-5"),
        ]
        for write in writes:
            with pytest.raises(pp.ReadOnly) as err:
                write()
            assert err.value.code == "read_only"
        assert ro.balance("alice").purchased == 5
        assert ro.verify().clean


def test_opening_what_is_not_a_database(tmp_path):
    with pytest.raises(pp.NotFound):
        pp.Store(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists(), "read-only never creates a file"
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    for writable in (False, True):
        with pytest.raises(pp.Backend) as err:
            pp.Store(foreign, writable=writable)
        assert err.value.code == "not_our_database"
    with pytest.raises(pp.InvalidInput):
        pp.Store(":memory:", writable=True)
    with pytest.raises(pp.PlaygroundError):
        pp.Store("postgres://nobody@127.0.0.1:1/nothing")


def test_open_is_store(tmp_path):
    s = pp.open(tmp_path / "x.db", writable=True, now="2026-01-02T03:04:05Z")
    assert isinstance(s, pp.Store) and s.now() == at(2026, 1, 2, 3, 4, 5)
    s.close()
