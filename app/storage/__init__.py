"""Storage: SQL (engines, tables, migrations, every query), Redis (keys, connections,
scripts), run-locks, claim leases and the beat leader lease.

Imports only the base layer (``app.settings``, ``app.errors``, ``app.clock``, ...).
"""
