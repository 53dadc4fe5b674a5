"""Database operations on the environment's PostgreSQL servers (provider-neutral)."""
