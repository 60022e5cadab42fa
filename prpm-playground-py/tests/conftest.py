"""Fixtures: every store test runs on a real SQLite file and on a real PostgreSQL database (a
throw-away cluster, the core's pg_cluster). Without PostgreSQL installed the PostgreSQL half
skips, unless PRPM_REQUIRE_POSTGRES=1 (CI), where that fails."""

import datetime
import os

import pytest

import prpm_playground as pp
from prpm_playground import _native

UTC = datetime.timezone.utc


def at(*args: int) -> datetime.datetime:
    return datetime.datetime(*args, tzinfo=UTC)


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = _native.TestCluster.start()  # raises when PRPM_REQUIRE_POSTGRES=1 and it cannot start
    if cluster is None:
        if os.environ.get("PRPM_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (PRPM_REQUIRE_POSTGRES=1) but not installed")
        pytest.skip("PostgreSQL is not installed here (CI installs it and sets PRPM_REQUIRE_POSTGRES=1)")
    return cluster


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """A fresh database: a SQLite file path, or a PostgreSQL connection string."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_cluster").create_database()


@pytest.fixture
def open_store(target):
    """Opens stores on the test's database (writable, on a clock set to `now`); closes them."""
    opened = []

    def open_(now=at(2026, 3, 1, 12), **kw):
        kw.setdefault("writable", True)
        s = pp.Store(target, now=now, **kw)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()
