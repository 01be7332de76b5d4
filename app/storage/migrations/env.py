"""Alembic environment, for ``autonomy db ...`` and for ``alembic`` run from the repository
(``alembic.ini`` at its root).

The URL is the config's ``sqlalchemy.url`` when the caller set one (``app.storage.db``
does), else the settings' ``database_url`` (``DATABASE_URL``). Online, the migrations run
on a connection; offline (``alembic upgrade head --sql``), they are written out as SQL for
the URL's dialect (PostgreSQL: SQLite's batch table rebuilds need the live table).

Autogenerate (``alembic check``) compares the models with the database, except where
SQLite cannot say: it does not reflect an index's expressions (``priority DESC`` in
``ix_task_lane_queue``), so such an index is left out of the comparison on SQLite only.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from alembic import context

from app.storage.credentials import credential_table
from app.storage.db import normalise_url
from app.storage.deployment import deployment_table
from app.storage.models import SQLModel

config = context.config
# the SQLModel entities, and the tables kept on metadata of their own beside the modules
# that alone use them (credentials: 0007, the deployment: 0008)
target_metadata = [SQLModel.metadata, credential_table.metadata, deployment_table.metadata]


def database_url() -> str:
    """The URL to migrate: the config's, else the settings' (``DATABASE_URL``)."""
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from app.settings import get_settings

        url = get_settings().database_url
    return normalise_url(url)


def _logging_for_the_alembic_command() -> None:
    # `alembic upgrade` says which revisions it ran in the app's log format; under
    # `autonomy db ...` (no ini file) the caller's logging stands
    if config.config_file_name is not None and not logging.getLogger().handlers:
        from app import logs

        logs.configure(process="cli")


def _has_expression(index: Any) -> bool:
    return any(not isinstance(e, sa.Column) for e in getattr(index, "expressions", []))


def include_object(obj: Any, name: str | None, type_: str, reflected: bool,
                   compare_to: Any) -> bool:
    """Leave out of autogenerate what this dialect cannot reflect (see the docstring)."""
    if type_ == "index" and context.get_context().dialect.name == "sqlite":
        return not (_has_expression(obj) or _has_expression(compare_to)
                    or (reflected and compare_to is None and name in _expression_indexes()))
    return True


def _expression_indexes() -> set[str]:
    return {str(ix.name) for meta in target_metadata for table in meta.tables.values()
            for ix in table.indexes if _has_expression(ix)}


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = sa.create_engine(database_url(), poolclass=sa.pool.NullPool)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            include_object=include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


_logging_for_the_alembic_command()
if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
