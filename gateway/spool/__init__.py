"""The durable spool: the Store protocol, SQLite and PostgreSQL, the asyncio face, replicas."""
