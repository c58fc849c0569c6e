"""Database URLs of team mode (Optuna's study, the registry's promotion lock): checked before use, so a missing
driver is named with the extra that installs it instead of surfacing as SQLAlchemy's import error mid-run.

SQLAlchemy's ``postgresql://`` means ``postgresql+psycopg://`` (psycopg 3) from SQLAlchemy 2.1 on; both need the
``team`` extra (``pip install -e '.[team]'``), as does ``postgresql+asyncpg://`` (the Prefect server's URL).
"""
from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

# The distribution that provides each DBAPI driver SQLAlchemy may ask for.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "asyncpg": "asyncpg", "psycopg2": "psycopg2-binary",
                   "pg8000": "pg8000", "pysqlite": "(part of Python)"}


def check_database_url(url: str, key: str) -> URL:
    """The parsed ``url`` of config key ``key``, once its dialect and driver are known to load; else ValueError
    naming the key, the URL (password hidden) and the package to install."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ValueError(f"{key}: {url!r} is not a database URL ({err})") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        hint = " (write postgresql://, not postgres://)" if parsed.drivername.startswith("postgres+") or \
            parsed.drivername == "postgres" else ""
        raise ValueError(f"{key}: {shown} names an unknown database dialect {parsed.drivername!r}{hint}") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        package = DRIVER_PACKAGES.get(dialect.driver, dialect.driver)
        raise ValueError(
            f"{key}: {shown} needs the {dialect.name} driver {dialect.driver!r}, which is not installed ({err}). "
            f"Install {package!r} (pip install -e '.[team]' brings psycopg 3 and asyncpg)") from None
    return parsed
