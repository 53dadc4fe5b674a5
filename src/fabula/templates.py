"""Rendering of the configuration files that sit beside the code that uses them."""
from __future__ import annotations

from pathlib import Path

import jinja2


def render(anchor_file: str, template: str, **values) -> str:
    """Render `template` from the `templates/` folder next to `anchor_file` (a module's __file__)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(anchor_file).parent / "templates"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    return env.get_template(template).render(**values)
