"""The seed's reference scenario reproduced from Python, and what-if simulations whose answers
are worked out by hand, on both backends."""

from decimal import Decimal

import pyarrow as pa
import pytest

import prpm_playground as pp
from conftest import at

SONNET = "claude-sonnet-4-5"


def test_reference_scenario(open_store):
    """60 Individual + 30 Org + 10 Free users at $0.92 / $0.60 / $0.15 of monthly API cost:
    revenue $450.00, cost $74.70, margin 83.4 %."""
    s = open_store(now=at(2026, 1, 15, 12))
    users = [f"user{i:03}" for i in range(100)]
    for i, u in enumerate(users):
        s.create_account(u, key=f"create:{u}")
        if i < 90:
            s.set_plan(u, 200, at(2026, 2, 14), key=f"plan:{u}")
        if 60 <= i < 90:
            s.set_cost_profile(u, org_member=True, key=f"org:{u}")
    # Costs over two days, each day within the tiers' daily limits.
    day_costs = lambda i: ("0.92", "0") if i < 60 else ("0.30", "0.30") if i < 90 else ("0.075", "0.075")  # noqa: E731
    for day in range(2):
        for i, u in enumerate(users):
            cost = day_costs(i)[day]
            if cost != "0":
                s.meter(u, model=SONNET, input_tokens=1_000, output_tokens=500, cost_usd=cost, key=f"d{day}-{u}")
        s.set_now(at(2026, 1, 16 + day, 12))

    summary = s.summary()
    assert summary.total_monthly_revenue_usd == Decimal("450.00")
    assert summary.total_monthly_cost_usd == Decimal("74.70")
    assert summary.overall_margin_pct == Decimal("83.4")
    assert (summary.users, summary.active_users, summary.throttled_users, summary.high_risk_users) == (100, 100, 0, 0)
    assert not summary.margin_below_70 and not summary.throttled_over_5pct

    # The tables say the same.
    users_t = pa.table(s.users())
    assert sum(users_t.column("monthly_revenue_usd").to_pylist()) == Decimal("450")
    assert sum(users_t.column("month_cost_usd").to_pylist()) == Decimal("74.70")
    tiers = users_t.group_by("tier").aggregate([("account", "count")]).to_pylist()
    assert sorted((t["tier"], t["account_count"]) for t in tiers) == [("free", 10), ("prpm_plus_individual", 60), ("prpm_plus_org", 30)]
    daily = pa.table(s.daily(start="2026-01-01", end="2026-02-01"))
    assert sum(daily.column("cost_usd").to_pylist()) == Decimal("74.70")
    assert sum(daily.column("plan_revenue_usd").to_pylist()) == Decimal("450"), "each plan's fee on the day its period started"

    # Replayed unchanged, the projection is the summary.
    same = s.simulate(start="2026-01-01", end="2026-02-01")
    assert (same.revenue_usd, same.cost_usd, same.margin_pct, same.months) == (Decimal("450"), Decimal("74.7"), Decimal("83.4"), 1)
    assert (same.admitted, same.refused, same.throttled_users) == (140, 0, [])
    # PRPM+ Individual at $7: revenue 60 x 7 + 30 x 3 = $510; margin (510 - 74.70) / 510 = 85.35 %.
    seven = s.simulate(start="2026-01-01", end="2026-02-01", tiers={"prpm_plus_individual": {"monthly_revenue": "7"}})
    assert (seven.revenue_usd, seven.cost_usd, seven.margin_pct) == (Decimal("510"), Decimal("74.7"), Decimal("85.4"))
    assert s.verify().clean


def hand_data(s):
    """Three users over March 2026 (costs metered, so the store records them all):

    * ind (PRPM+ Individual, pays $6; $1.00 a day, $5.00 a month): three runs of $0.40 on the
      2nd, one of 16,000 input tokens ($0.10) on the 3rd, one of $0.50 on the 4th;
    * org (PRPM+ Org, pays $3; $0.50 a day, $2.50 a month): $0.45 a day on the 1st to 6th;
    * free ($0; $0.10 a day): three runs of $0.05 on the 2nd.
    """
    s.create_account("ind", key="c-ind")
    s.create_account("org", key="c-org")
    s.create_account("free", key="c-free")
    s.set_plan("ind", 200, at(2026, 3, 31), key="p-ind")
    s.set_plan("org", 200, at(2026, 3, 31), key="p-org")
    s.set_cost_profile("org", org_member=True, key="o-org")
    events = []
    events += [(at(2026, 3, 2, 9 + h), "ind", 4_000, 1_000, "0.40") for h in range(3)]
    events += [(at(2026, 3, 3, 9), "ind", 16_000, 0, "0.10"), (at(2026, 3, 4, 9), "ind", 6_000, 4_000, "0.50")]
    events += [(at(2026, 3, d, 12), "org", 1_000, 1_000, "0.45") for d in range(1, 7)]
    events += [(at(2026, 3, 2, 13 + h), "free", 500, 500, "0.05") for h in range(3)]
    for n, (when, who, inp, out, cost) in enumerate(sorted(events)):
        s.set_now(when)
        s.meter(who, model=SONNET, input_tokens=inp, output_tokens=out, cost_usd=cost, key=f"e{n}")
    s.set_now(at(2026, 3, 20))


def test_simulation_checked_by_hand(open_store):
    s = open_store(now=at(2026, 3, 1, 0))
    hand_data(s)
    march = dict(start="2026-03-01", end="2026-04-01")

    today = s.simulate(**march)
    # ind: $0.40 + $0.40; the third $0.40 would make $1.20 > $1.00 a day: refused. $0.10 and
    # $0.50 on later days: admitted. $1.40.
    # org: $0.45 a day for five days = $2.25; the sixth would make $2.70 > $2.50: refused.
    # free: $0.05 + $0.05 reaches $0.10 a day: throttled; the third is refused as throttled.
    # Revenue $6 + $3 = $9, cost $1.40 + $2.25 + $0.10 = $3.75, margin 5.25 / 9 = 58.3 %.
    assert (today.revenue_usd, today.cost_usd, today.margin_pct) == (Decimal("9"), Decimal("3.75"), Decimal("58.3"))
    assert today.refused_by == {"daily_cost_limit": 1, "monthly_cost_limit": 1, "throttled": 1}
    assert (today.admitted, today.refused, today.refused_cost_usd) == (11, 3, Decimal("0.90"))
    assert today.throttled_users == ["free"]
    by_user = {r["account"]: r for r in pa.table(today.by_user()).to_pylist()}
    assert (by_user["ind"]["cost_usd"], by_user["org"]["cost_usd"], by_user["free"]["cost_usd"]) == (Decimal("1.4"), Decimal("2.25"), Decimal("0.1"))
    assert (by_user["free"]["throttled_at"], by_user["free"]["throttle_reason"]) == (at(2026, 3, 2, 14), "daily_cost_limit")
    # Credits (1 credit per 5,000 tokens, at least 1): ind 1 + 1 + 4 + 2 = 8, org 5, free 2.
    assert (by_user["ind"]["credits"], by_user["org"]["credits"], by_user["free"]["credits"], today.credits) == (8, 5, 2, 15)

    # The documents' adjustments: org limit $2.00, Individual at $7, a 15,000-token request cap.
    adjusted = s.simulate(
        **march,
        tiers={"prpm_plus_org": {"monthly_cost_limit": Decimal("2.00")}, "prpm_plus_individual": {"monthly_revenue": 7}},
        request_cap_tokens=15_000,
    )
    # ind loses the 16,000-token request: $1.30. org: 4 x $0.45 = $1.80; the fifth would make
    # $2.25 > $2.00 and the sixth too: refused. free: $0.10. Revenue $10, cost $3.20: 68 %.
    assert (adjusted.revenue_usd, adjusted.cost_usd, adjusted.margin_pct) == (Decimal("10"), Decimal("3.2"), Decimal("68.0"))
    assert adjusted.refused_by == {"request_too_large": 1, "daily_cost_limit": 1, "monthly_cost_limit": 2, "throttled": 1}
    by_tier = {r["tier"]: r for r in pa.table(adjusted.by_tier()).to_pylist()}
    # The org tier: $3 against $1.80: 40 %.
    assert (by_tier["prpm_plus_org"]["revenue_usd"], by_tier["prpm_plus_org"]["cost_usd"], by_tier["prpm_plus_org"]["margin_pct"]) == (
        Decimal("3"), Decimal("1.8"), Decimal("40.0"),
    )
    assert by_tier["free"]["margin_pct"] is None

    # Sonnet re-priced at $1 / $5 per million tokens, 10,000 tokens a credit.
    cheap = s.simulate(**march, prices={SONNET: {"input": "1", "output": "5"}}, tokens_per_credit=10_000)
    # ind: 3 x (4,000 x $1 + 1,000 x $5) = $0.027, 16,000 x $1 = $0.016, 6,000 + 4 x $5,000 =
    # $0.026: $0.069. org: 6 x ($0.001 + $0.005) = $0.036. free: 3 x ($0.0005 + $0.0025) =
    # $0.009. All admitted; cost $0.114; margin (9 - 0.114) / 9 = 98.7 %.
    assert (cheap.cost_usd, cheap.refused, cheap.margin_pct) == (Decimal("0.114"), 0, Decimal("98.7"))
    # Credits at 10,000 tokens: ind 1+1+1+2+1 = 6, org 6, free 3.
    assert cheap.credits == 15

    # The period counts its months: February to March is two months of revenue.
    two = s.simulate(start="2026-02-01", end="2026-04-01")
    assert (two.months, two.revenue_usd, two.cost_usd) == (2, Decimal("18"), Decimal("3.75"))

    for bad in (
        dict(tiers={"gold": {"monthly_revenue": 1}}),
        dict(tiers={"free": {"colour": "red"}}),
        dict(tiers={"free": {"daily_cost_limit": 0.1}}),
        dict(prices={"no-such-model": {"input": 1}}),
        dict(multipliers={SONNET: 0}),
        dict(tokens_per_credit=0),
    ):
        with pytest.raises(pp.InvalidInput):
            s.simulate(**march, **bad)
