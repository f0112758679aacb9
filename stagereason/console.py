"""Printing results: a short table for people, one JSON object with ``--json``."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["report"]


def report(title: str, data: dict[str, Any], as_json: bool = False) -> None:
    """Print ``data`` as a two-column table titled ``title``, or as one JSON line."""
    if as_json:
        print(json.dumps(data, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in data.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(str(key), str(value))
    Console(file=sys.stdout, soft_wrap=True).print(table)
