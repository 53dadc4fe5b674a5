"""The user's actions on a whole environment: create, describe, destroy."""
