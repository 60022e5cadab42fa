"""The exception tree: each failure and refusal of the library raises its class, with its code
and details, and nothing is written."""

import datetime
from decimal import Decimal

import pytest

import prpm_playground as pp
from conftest import at


def test_the_tree():
    for cls in (pp.InsufficientCredits, pp.RateLimited, pp.Throttled, pp.NotFound, pp.Conflict, pp.InvalidInput, pp.Backend, pp.ReadOnly):
        assert issubclass(cls, pp.PlaygroundError)
    assert issubclass(pp.CostLimitExceeded, pp.Throttled)
    assert issubclass(pp.RequestTooLarge, pp.InvalidInput)
    assert issubclass(pp.PlaygroundError, Exception)


def test_refusals_and_failures(open_store):
    s = open_store()
    s.create_account("free-user", key="c1")  # 5 credits, the free tier: 10 requests an hour, $0.10 a day
    before = s.balance("free-user").available

    with pytest.raises(pp.InsufficientCredits) as e:
        s.spend("free-user", 6, key="too-much")
    assert (e.value.code, e.value.needed, e.value.available) == ("insufficient_credits", 6, 5)
    assert "6 needed, 5 available" in str(e.value)

    # The daily cost limit ($0.10): a worst case above it is refused before anything is held.
    with pytest.raises(pp.CostLimitExceeded) as e:
        s.hold("free-user", 1, cost_usd="0.10001", key="big")
    assert isinstance(e.value, pp.Throttled)
    assert (e.value.code, e.value.reason) == ("daily_cost_limit", "daily_cost_limit")
    assert (e.value.limit_usd, e.value.spent_usd, e.value.held_usd, e.value.requested_usd) == (Decimal("0.1"), 0, 0, Decimal("0.10001"))

    # Ten requests an hour, then a refusal that says when the next slot opens.
    for i in range(10):
        h = s.hold("free-user", 1, key=f"h{i}")
        s.release(h.hold, key=f"r{i}")
        s.set_now(at(2026, 3, 1, 12, i + 1))
    with pytest.raises(pp.RateLimited) as e:
        s.hold("free-user", 1, key="h10")
    # The first request was at 12:00, now is 12:10: the slot opens in 50 minutes.
    assert (e.value.code, e.value.limit, e.value.retry_after_ms) == ("rate_limited", 10, 50 * 60_000)

    s.create_account("bob", key="c2")
    s.throttle("bob", by="ops", why="abuse", key="t1")
    with pytest.raises(pp.Throttled) as e:
        s.hold("bob", 1, key="hb")
    assert (type(e.value), e.value.code, e.value.reason) == (pp.Throttled, "throttled", "admin")

    with pytest.raises(pp.NotFound) as e:
        s.balance("nobody")
    assert e.value.code == "unknown_account"
    with pytest.raises(pp.NotFound) as e:
        s.settle(987_654, 1, key="s-unknown")
    assert e.value.code == "unknown_hold"

    with pytest.raises(pp.Conflict) as e:
        s.grant("bob", 7, key="c2")  # the key of an earlier, different request
    assert e.value.code == "idempotency_conflict"
    with pytest.raises(pp.Conflict) as e:
        s.create_account("bob", key="c3")
    assert e.value.code == "account_exists"
    s.unthrottle("bob", by="ops", why="ok", key="u1")
    with pytest.raises(pp.Conflict) as e:
        s.unthrottle("bob", by="ops", why="again", key="u2")
    assert e.value.code == "not_throttled"
    h = s.hold("bob", 1, key="hb2")
    s.settle(h.hold, 1, key="sb2")
    with pytest.raises(pp.Conflict) as e:
        s.settle(h.hold, 1, key="sb3")
    assert e.value.code == "already_settled"

    bad = [
        (lambda: s.grant("bob", 0), "amount"),
        (lambda: s.grant("bob", 1, bucket="gold"), "bucket"),
        (lambda: s.hold("bob", 1, cost_usd=0.05), "cost_usd"),  # a float is not exact money
        (lambda: s.hold("bob", 1, cost_usd="0.0000001"), "cost_usd"),  # below a micro-dollar
        (lambda: s.meter("bob", model="claude-sonnet-4-5", input_tokens=-1), "input_tokens"),
        (lambda: s.spend("bob", input_tokens=5), "model"),
        (lambda: s.create_account("x" * 200), "account"),
        (lambda: s.create_account("carol", "robot"), "kind"),
        (lambda: s.usage(start="2026-03-02", end="2026-03-01"), "from"),
        (lambda: s.usage(start="yesterday"), "start"),
        (lambda: s.transactions(kinds=["grant", "gift"]), "kind"),
    ]
    for call, field in bad:
        with pytest.raises(pp.InvalidInput) as e:
            call()
        assert e.value.field == field, (field, e.value)
        assert e.value.code == "invalid_input"
    with pytest.raises(pp.InvalidInput) as e:
        s.spend("bob", model="no-such-model", input_tokens=5)
    assert e.value.code == "unknown_model"

    # Nothing refused above wrote anything.
    assert s.balance("free-user").available == before
    assert s.verify().clean


def test_backend_errors(tmp_path):
    s = pp.Store(tmp_path / "x.db", writable=True, now=datetime.datetime(2026, 1, 1))
    s.close()
    for call in (s.summary, s.verify, lambda: s.create_account("a"), s.users, s.now):
        with pytest.raises(pp.Backend) as e:
            call()
        assert e.value.code == "closed"
