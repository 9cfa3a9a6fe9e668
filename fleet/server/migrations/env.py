"""Alembic environment: run against the connection ``Database.migrate`` hands in, or
the URL in ``sqlalchemy.url`` (``alembic -x`` use while writing a migration)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from fleet.server.db.schema import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
