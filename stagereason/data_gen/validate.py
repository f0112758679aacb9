"""``stagereason validate``: check a dataset in the LLaVA-CoT layout before training on it.

Checks every row: the line parses, roles alternate
human/gpt, at most one ``<image>`` placeholder per image (none is fine: the
published LLaVA-CoT-100k strips them), every image exists and decodes, and
every gpt turn passes the strict stage format.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stagereason.data_gen.records import iter_records
from stagereason.data_gen.sources import IMAGE_PLACEHOLDER
from stagereason.stages import TraceFormatError, parse_trace

__all__ = ["ValidateConfig", "ValidationReport", "check_dataset", "resolve_data_file", "run_validate"]


@dataclasses.dataclass
class ValidateConfig:
    """Options of ``stagereason validate``."""

    path: str = dataclasses.field(metadata={"help": "A gen output directory or a data.jsonl / .json file."})
    image_root: str | None = dataclasses.field(
        default=None, metadata={"help": "Folder the rows' image paths are relative to (default: the file's folder)."})
    check_images: bool = dataclasses.field(default=True, metadata={"help": "Open and decode every image."})
    show: int = dataclasses.field(default=5, metadata={"help": "Row ids to list per problem."})
    json: bool = dataclasses.field(default=False, metadata={"help": "Print one JSON object."})


@dataclasses.dataclass
class ValidationReport:
    """Problems by row. ``problems[row_id]`` lists messages; ``kinds`` counts rows per problem kind."""

    path: str
    rows: int = 0
    images: int = 0
    problems: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    kinds: Counter = dataclasses.field(default_factory=Counter)
    repeated_ids: dict[str, int] = dataclasses.field(default_factory=dict)  # not an error: one image, many questions

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, row: str, kind: str, message: str) -> None:
        if kind not in {m.split(":", 1)[0] for m in self.problems.get(row, [])}:
            self.kinds[kind] += 1
        self.problems.setdefault(row, []).append(f"{kind}: {message}")

    def by_kind(self) -> dict[str, list[str]]:
        out = defaultdict(list)
        for row, msgs in self.problems.items():
            for kind in dict.fromkeys(m.split(":", 1)[0] for m in msgs):
                out[kind].append(row)
        return dict(out)


def resolve_data_file(path: str | Path) -> Path:
    """A gen output dir means its ``data.jsonl``; a file is itself.

    Raises:
        FileNotFoundError: nothing usable at ``path``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "data.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no dataset at {path} (expected a data.jsonl file or a gen output directory)")
    return p


def _check_image(path: Path) -> str | None:
    from PIL import Image

    if not path.is_file():
        return f"missing image {path}"
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEGs decode at reduced scale: fast, still reads every byte
            im.load()
    except Exception as err:  # PIL raises many types for corrupt data
        return f"image {path} does not decode ({type(err).__name__}: {err})"
    return None


def check_row(rec: dict, row: str, root: Path, report: ValidationReport) -> list[Path]:
    """Check one row's structure and traces; return the image paths it uses."""
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        report.add(row, "roles", "no conversations")
        return []
    turns = [t for t in convs if not (isinstance(t, dict) and t.get("from") == "system")]
    for i, t in enumerate(turns):
        want = ("human", "user") if i % 2 == 0 else ("gpt", "assistant")
        role = t.get("from") if isinstance(t, dict) else None
        if role not in want:
            report.add(row, "roles", f"turn {i + 1} is {role!r}, expected {want[0]!r}")
            return []
        if not isinstance(t.get("value"), str) or not t["value"].strip():
            report.add(row, "empty_turn", f"turn {i + 1} ({role}) is empty")
    if len(turns) % 2:
        report.add(row, "roles", "ends with a human turn that has no answer")
    image = rec.get("image")
    images = [] if image is None else image if isinstance(image, list) else [image]
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns[::2] if isinstance(t.get("value"), str))
    if placeholders > len(images):
        report.add(row, "placeholders", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    for i, t in enumerate(turns[1::2]):
        if isinstance(t.get("value"), str) and t["value"].strip():
            try:
                parse_trace(t["value"])
            except TraceFormatError as err:
                report.add(row, "stage_format", f"gpt turn {i + 1}: {err.problems[0]}")
    return [root / str(p) for p in images]


def check_dataset(path: str | Path, image_root: str | Path | None = None, check_images: bool = True,
                  workers: int = 8, records: list | None = None) -> ValidationReport:
    """Validate a dataset (see the module docstring). Never raises on bad rows; see the report.

    ``records``, when given, receives ``(name, row)`` for every JSON-object row as read, named as the
    report names it (its id, or where it is; a repeated id gets ``#1``, ``#2``...), so a caller that
    also needs the rows neither reads and parses the file a second time nor names them again.

    Raises:
        FileNotFoundError: ``path`` is neither a data file nor a gen output dir.
        ValueError: a file that cannot be read as rows at all (``records.iter_records``).
    """
    data = resolve_data_file(path)
    root = Path(image_root) if image_root else data.parent
    report = ValidationReport(path=str(data))
    seen: set[str] = set()
    to_check: list[tuple[str, Path]] = []
    for where, rec, err in iter_records(data):
        report.rows += 1
        if rec is None:
            report.add(where, "json", err)
            continue
        row = str(rec.get("id", where))
        if row in seen:
            report.repeated_ids[row] = report.repeated_ids.get(row, 1) + 1
            row = f"{row}#{report.repeated_ids[row] - 1}"  # each row keeps its own name in the report
        seen.add(row)
        if records is not None:
            records.append((row, rec))
        to_check += [(row, p) for p in check_row(rec, row, root, report)]
    report.images = len(to_check)
    if check_images and to_check:
        unique = sorted({p for _, p in to_check})
        with ThreadPoolExecutor(workers) as pool:
            errors = dict(zip(unique, pool.map(_check_image, unique), strict=True))
        for row, p in to_check:
            if errors[p]:
                report.add(row, "image", errors[p])
    return report


def run_validate(cfg: ValidateConfig) -> int:
    """Print a summary by problem with row ids; return exit status 1 when any row is bad."""
    from stagereason.console import report as show

    rep = check_dataset(cfg.path, cfg.image_root, cfg.check_images)
    by_kind = rep.by_kind()
    summary = {"path": rep.path, "rows": rep.rows, "images": rep.images, "bad_rows": len(rep.problems)}
    if rep.repeated_ids:
        shown = ", ".join(list(rep.repeated_ids)[: cfg.show])
        summary["repeated ids (not an error)"] = f"{len(rep.repeated_ids)}: {shown}"
    for kind, rows in sorted(by_kind.items()):
        more = f" (+{len(rows) - cfg.show} more)" if len(rows) > cfg.show else ""
        summary[kind] = f"{len(rows)} rows: " + ", ".join(rows[: cfg.show]) + more
    if cfg.json:
        summary = {**summary, "problems": rep.problems}
    show("dataset is valid" if rep.ok else "dataset has problems", summary, cfg.json)
    if not rep.ok and not cfg.json:
        for row, msgs in list(rep.problems.items())[: cfg.show]:
            print(f"  {row}: {msgs[0]}")
    return 0 if rep.ok else 1
