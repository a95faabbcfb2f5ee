"""Pick the document store backend from `store.kind`; PostgreSQL (and psycopg) is imported only when chosen."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kfresh.indexer.stores.base import DocumentStore

if TYPE_CHECKING:
    from kfresh.core.config import StoreConfig


def open_store(cfg: StoreConfig, *, read_only: bool = False) -> DocumentStore:
    """Open (creating its tables unless `read_only`) the store `cfg` names.

    read_only: the finetuner's view; every connection refuses writes at the database level, and a store
    that does not exist yet raises FileNotFoundError instead of being created.
    """
    if cfg.kind == "postgres":
        from kfresh.indexer.stores.postgres import PostgresStore

        return PostgresStore(cfg.dsn.get_secret_value(), read_only=read_only, pool_size=cfg.pool_size)
    from kfresh.indexer.stores.sqlite import SqliteStore

    return SqliteStore(cfg.path, read_only=read_only, secure_delete=cfg.secure_delete)


def store_exists(cfg: StoreConfig) -> bool:
    """Whether a server has created the store yet (the SQLite file, or the tables in the PostgreSQL database)."""
    if cfg.kind == "postgres":
        from kfresh.indexer.stores.postgres import schema_exists

        return schema_exists(cfg.dsn.get_secret_value())
    return cfg.path.is_file()
