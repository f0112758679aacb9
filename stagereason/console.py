"""Printing results: a short table for people, one JSON object with ``--json``."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any

__all__ = ["json_stdout", "print_json", "report"]

_json_out = None  # where JSON results go while json_stdout() sends everything else to stderr


@contextlib.contextmanager
def json_stdout():
    """Keep standard output for the JSON result alone: whatever else is printed meanwhile (libraries' notices,
    the trainer's metrics) goes to standard error, so that ``VERB --json | jq`` reads one object."""
    global _json_out
    previous, _json_out = _json_out, sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_out = previous


def _finite(data: Any) -> Any:
    """``data`` with NaN and infinities as None: strict JSON readers (jq, JavaScript) refuse ``NaN``."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def print_json(data: Any, **kwargs) -> None:
    """Print ``data`` as one JSON line on standard output (the real one, inside :func:`json_stdout`)."""
    print(json.dumps(_finite(data), default=str, **kwargs), file=_json_out or sys.stdout, flush=True)


def report(title: str, data: dict[str, Any], as_json: bool = False) -> None:
    """Print ``data`` as a two-column table titled ``title``, or as one JSON line."""
    if as_json:
        print_json(data)
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
