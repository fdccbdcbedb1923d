"""The PostgreSQL URL forms users paste work, and a missing driver is a one-line error."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from registry.db import (
    DatabaseDriverMissingError,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)
from tests.fixtures.backends import drop_postgres_database, fresh_postgres_database


@pytest.mark.postgres
@pytest.mark.parametrize("drivername", ["postgresql", "postgresql+psycopg", "postgresql+psycopg2"])
def test_every_postgresql_url_form_upgrades_and_reads_the_schema(postgres_server, drivername):
    plain = fresh_postgres_database(postgres_server, None)
    url = make_url(plain).set(drivername=drivername).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        engine.dispose()
    finally:
        drop_postgres_database(postgres_server, plain)


def test_the_plain_postgresql_url_uses_psycopg_3():
    assert make_engine("postgresql://user@127.0.0.1/db").dialect.driver == "psycopg"


def test_a_url_naming_an_uninstalled_driver_names_the_package():
    with pytest.raises(DatabaseDriverMissingError, match="'pg8000'") as caught:
        make_engine("postgresql+pg8000://user@127.0.0.1/db")
    assert "\n" not in str(caught.value)
