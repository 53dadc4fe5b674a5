"""Rendering of the configuration files that sit beside the code that uses them."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2


@cache
def _templates(folder: Path) -> jinja2.Environment:
    # one per folder, for the process: each template is compiled once, not once per server
    # (Jinja's own cache lives in its Environment)
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )


def render(anchor_file: str, template: str, **values) -> str:
    """Render `template` from the `templates/` folder next to `anchor_file` (a module's __file__)."""
    return _templates(Path(anchor_file).parent / "templates").get_template(template).render(**values)
