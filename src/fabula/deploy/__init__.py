"""Releases, deploys, the environment's lock and its history of operations."""
