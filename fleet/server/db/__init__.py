"""The fleet server's database: SQLite in the data directory by default, or PostgreSQL."""

from .database import Database, DatabaseError, default_url

__all__ = ["Database", "DatabaseError", "default_url"]
