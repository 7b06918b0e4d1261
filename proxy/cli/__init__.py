"""The `spendgate` command line. Exit 0 on success; otherwise one line on stderr and a non-zero exit.

Commands import what they use when they run, so `spendgate --help` (and every command that does not need them)
starts without SQLAlchemy, Alembic or aiohttp; tests/test_cli_errors.py checks it.
"""
