"""Providers make, find and remove servers and run commands on them.

Roles talk only to the interfaces in ``base``; nothing in a role knows which provider runs it.
"""
