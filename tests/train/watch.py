"""Watch a training subprocess: its stderr collected on a thread, and an event once its progress bar shows a step."""

import re
import threading


def watch_stderr(proc, steps: int) -> tuple[list[str], threading.Event, threading.Thread]:
    """``(lines, started, reader)``: ``proc``'s stderr lines as they come, an event set once the training bar of
    ``steps`` steps shows a finished step (not a loading bar), and the reading thread (join it once ``proc`` has
    ended for every line)."""
    lines, started = [], threading.Event()

    def read():
        for line in iter(proc.stderr.readline, ""):
            lines.append(line)
            if re.search(rf"\b[1-9]\d*/{steps} \[", line):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, started, reader
