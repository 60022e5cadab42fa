"""Cost and margin per tier and model, with a chart.

    python examples/cost_report.py DATABASE [--month 2026-03] [--chart cost_report.png]
    python examples/cost_report.py --demo demo.db   # builds a demo database first

DATABASE is a SQLite file or a PostgreSQL URL, opened read-only. The report takes one UTC
month: the users' tiers and plan revenue now, and the usage log of that month (cost per tier
and model). Needs `pip install ./prpm-playground-py pandas pyarrow matplotlib`.
"""

from __future__ import annotations

import argparse
import datetime
import random
from decimal import Decimal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import prpm_playground as pp  # noqa: E402

UTC = datetime.timezone.utc
MODELS = {"claude-sonnet-4-5": 0.62, "claude-opus-4-5": 0.08, "claude-haiku-4-5": 0.15, "gpt-4o-mini": 0.15}


def build_demo(path: str, month: datetime.date) -> None:
    """120 users (70 Individual, 35 Org members, 15 Free), a month of metered runs priced from
    the price table, generated from a fixed seed."""
    rng = random.Random(42)
    start = datetime.datetime(month.year, month.month, 1, tzinfo=UTC)
    with pp.Store(path, writable=True, now=start) as s:
        users = []
        for i in range(120):
            u = f"user{i:03}"
            s.create_account(u, key=f"create:{u}")
            if i < 105:
                s.set_plan(u, 60, start + datetime.timedelta(days=30), key=f"plan:{u}")
            if 70 <= i < 105:
                s.set_cost_profile(u, org_member=True, key=f"org:{u}")
            users.append((u, 3.0 if i < 70 else 2.0 if i < 105 else 0.6))
        events = []
        for u, runs_per_day in users:
            for day in range(28):
                for n in range(rng.randint(0, int(runs_per_day * 2))):
                    model = rng.choices(list(MODELS), weights=list(MODELS.values()))[0]
                    at = start + datetime.timedelta(days=day, minutes=rng.randint(0, 24 * 60 - 1))
                    events.append((at, u, model, rng.randint(300, 6_000), rng.randint(100, 1_500)))
        for n, (at, u, model, inp, out) in enumerate(sorted(events)):
            s.set_now(at)
            s.meter(u, model=model, operation="playground_run", input_tokens=inp, output_tokens=out, key=f"run:{n}")
        s.set_now(start + datetime.timedelta(days=28))


def report(target: str, month: datetime.date, chart: str) -> None:
    start = datetime.datetime(month.year, month.month, 1, tzinfo=UTC)
    end = (start + datetime.timedelta(days=32)).replace(day=1)
    # Read-only, on a clock at the month's end (or now, if the month is not over): the users'
    # month costs and the summary are then that month's.
    now = min(end - datetime.timedelta(seconds=1), datetime.datetime.now(UTC))
    with pp.Store(target, now=now) as s:
        users = s.users().to_pandas()
        usage = s.usage(start=start, end=end).to_pandas()
        summary = s.summary()
    usage = usage.merge(users[["account", "tier"]], on="account", how="left")

    tiers = users.groupby("tier").agg(users=("account", "count"), revenue_usd=("monthly_revenue_usd", "sum"))
    tiers["cost_usd"] = usage.groupby("tier")["cost_usd"].sum()
    tiers = tiers.fillna(Decimal(0))
    tiers["margin_pct"] = [
        None if r == 0 else ((r - c) * 100 / r).quantize(Decimal("0.1")) for r, c in zip(tiers["revenue_usd"], tiers["cost_usd"])
    ]
    models = usage.groupby(["tier", "model"]).agg(runs=("entry", "count"), tokens=("total_tokens", "sum"), cost_usd=("cost_usd", "sum"))

    print(f"Cost report for {month:%Y-%m} ({target})\n")
    print(tiers.to_string(), "\n")
    print(models.to_string(), "\n")
    print(
        f"Summary at {now:%Y-%m-%d %H:%M} UTC: revenue ${summary.total_monthly_revenue_usd:.2f}, cost ${summary.total_monthly_cost_usd:.2f}, "
        f"margin {summary.overall_margin_pct} %, {summary.throttled_users} throttled, {summary.high_risk_users} high risk"
    )

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(tiers.index)
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [float(v) for v in tiers["revenue_usd"]], width=0.4, label="plan revenue", color="#4c72b0")
    left.bar([i + 0.2 for i in x], [float(v) for v in tiers["cost_usd"]], width=0.4, label="provider cost", color="#dd8452")
    for i, (r, m) in enumerate(zip(tiers["revenue_usd"], tiers["margin_pct"])):
        left.annotate("no revenue" if m is None else f"margin {m} %", (i, float(r)), ha="center", va="bottom", fontsize=9)
    left.set_xticks(list(x), [n.replace("prpm_plus_", "PRPM+ ") for n in names])
    left.set_ylabel("USD")
    left.set_title(f"Revenue and cost per tier, {month:%B %Y}")
    left.legend()

    pivot = models["cost_usd"].unstack("model").fillna(Decimal(0))
    bottom = [0.0] * len(pivot.index)
    for model in pivot.columns:
        values = [float(v) for v in pivot[model]]
        right.bar([n.replace("prpm_plus_", "PRPM+ ") for n in pivot.index], values, bottom=bottom, label=model)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_ylabel("USD")
    right.set_title("Provider cost per tier and model")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(chart, dpi=110)
    print(f"\nchart: {chart}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("database", help="SQLite file or PostgreSQL URL")
    p.add_argument("--month", default=None, help="YYYY-MM (default: the demo's month, or this month)")
    p.add_argument("--chart", default="cost_report.png")
    p.add_argument("--demo", action="store_true", help="build a demo database at DATABASE first")
    a = p.parse_args()
    if a.month:
        month = datetime.date.fromisoformat(a.month + "-01")
    elif a.demo:
        month = datetime.date(2026, 3, 1)
    else:
        month = datetime.datetime.now(UTC).date().replace(day=1)
    if a.demo:
        build_demo(a.database, month)
    report(a.database, month, a.chart)


if __name__ == "__main__":
    main()
