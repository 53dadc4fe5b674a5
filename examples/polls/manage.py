#!/usr/bin/env python3
"""Django's command-line utility for the polls example."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polls.settings")
    try:
        from django.core.management import execute_from_command_line
    except ImportError as exc:
        raise ImportError(
            "Couldn't import Django. Is it installed and is the virtualenv "
            "active? (pip install -r requirements.txt)"
        ) from exc
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
