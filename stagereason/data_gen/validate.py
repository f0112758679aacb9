"""``stagereason validate``: check a dataset in the LLaVA-CoT layout before training on it.

Checks every row: the line parses, an optional system turn comes first and
is not empty, roles alternate human/gpt, the ``<image>`` placeholders (over
all human turns) match the images one to one (none at all is fine: the
published LLaVA-CoT-100k strips them), every image exists and decodes as
training decodes it, and every gpt turn passes the strict stage format.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stagereason.data_gen.records import iter_records
from stagereason.data_gen.sources import (
    _HF_DISK_FILES,
    HF_FILE_TYPES,
    IMAGE_PLACEHOLDER,
    _is_hf_disk,
    _unique_name,
    image_field,
)
from stagereason.stages import TraceFormatError, parse_trace

__all__ = ["ValidateConfig", "ValidationReport", "check_dataset", "resolve_data_file", "run_validate"]


@dataclasses.dataclass
class ValidateConfig:
    """Options of ``stagereason validate``."""

    path: str = dataclasses.field(metadata={"help": "A gen output directory, a data.jsonl / .json file, or a HF "
                                                    "dataset (save_to_disk folder, parquet file, Hub name)."})
    image_root: str | None = dataclasses.field(
        default=None, metadata={"help": "Folder the rows' image paths are relative to (default: the file's folder)."})
    check_images: bool = dataclasses.field(default=True, metadata={
        "help": "Open and decode every image (--no_check_images: only check that each is there)."})
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


def _data_files(folder: Path) -> list[Path]:
    """The data files in ``folder``: its ``data.jsonl`` (gen output), else all its ``.jsonl`` / ``.json`` files."""
    if (folder / "data.jsonl").is_file():
        return [folder / "data.jsonl"]
    return sorted(f for f in folder.iterdir() if f.suffix in (".jsonl", ".json") and f.is_file()
                  and f.name not in _HF_DISK_FILES)


def resolve_data_file(path: str | Path) -> Path:
    """A file is itself; a folder means its ``data.jsonl`` (gen output), else its one ``.jsonl`` / ``.json`` file.

    Raises:
        FileNotFoundError: nothing usable at ``path``.
        ValueError: a folder without ``data.jsonl`` holding several data files (they are named).
    """
    p = Path(path)
    if p.is_dir():
        found = _data_files(p)
        if len(found) > 1:
            raise ValueError(f"{path} holds several data files ({', '.join(f.name for f in found)}); "
                             "pass the one to use")
        p = found[0] if found else p / "data.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no dataset at {path} (expected a data.jsonl file or a gen output directory)")
    return p


# Big photos are data, not attacks: PIL's default cap (~89M pixels) calls a valid 15000x15000 scan a
# "decompression bomb". Training shrinks big images anyway; beyond this cap an image is too big to decode.
_MAX_PIXELS = 1 << 30


def _open_pil(src):
    """Open (lazily) a path, bytes, or HF image cell ``{"bytes", "path"}``."""
    import io

    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(src))
    if isinstance(src, dict):
        return Image.open(io.BytesIO(src["bytes"])) if src.get("bytes") else Image.open(src["path"])
    return Image.open(src)


def _to_rgb(im):
    """Decode ``im`` as upright 8-bit RGB: EXIF orientation first, transparency over white, 16-bit scaled."""
    import numpy as np
    from PIL import ExifTags, Image, ImageOps

    try:
        turned = im.getexif().get(ExifTags.Base.Orientation, 1) != 1
    except Exception:  # an unreadable EXIF block says nothing about the pixels: shown as stored
        turned = False
    if turned:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: scale, never saturate at 255
        grey = np.asarray(im.convert("I"), dtype=np.float64)
        if im.mode != "I" or grey.max() > 255:  # 32-bit "I" holding 8-bit values stays as it is
            grey = grey / 257
        im = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        white.alpha_composite(im)
        return white.convert("RGB")
    return im.convert("RGB")


def _check_image(src, name: str | None = None, decode: bool = True) -> str | None:
    """A problem with one image (a path, or a HF image cell), or None: there, and (``decode``) decoded as training
    decodes it, small."""
    if not name:
        name = (src.get("name") or src.get("path") or "<bytes>") if isinstance(src, dict) else str(src)
    if isinstance(src, Path) and src.is_dir():
        return f"image {src} is a folder, not an image file"
    if isinstance(src, Path) and not src.is_file():
        return f"missing image {src}"
    if isinstance(src, dict) and not src.get("bytes") and not (src.get("path") and Path(src["path"]).is_file()):
        return f"missing image {name}"
    if not decode:
        return None
    try:
        with _open_pil(src) as im:
            im.draft("RGB", (64, 64))  # JPEGs decode at reduced scale: fast, still reads every byte
            _to_rgb(im)
    except Exception as err:  # PIL raises many types for corrupt data
        return f"image {name} does not decode ({type(err).__name__}: {err})"
    return None


def _check_turns(convs: list, row: str, report: ValidationReport) -> list | None:
    """The human/gpt turns of a conversation, or None when its roles are wrong (reported)."""
    for i, t in enumerate(convs):
        if isinstance(t, dict) and t.get("from") == "system":
            if i:
                report.add(row, "roles", f"turn {i + 1} is a system turn; only the first turn may be")
                return None
            if not isinstance(t.get("value"), str) or not t["value"].strip():
                report.add(row, "empty_turn", "the system turn is empty or has no value")
    turns = convs[1:] if isinstance(convs[0], dict) and convs[0].get("from") == "system" else convs
    for i, t in enumerate(turns):
        want = ("human", "user") if i % 2 == 0 else ("gpt", "assistant")
        role = t.get("from") if isinstance(t, dict) else None
        if role is None and isinstance(t, dict) and "role" in t and "content" in t:
            report.add(row, "roles", f"turn {i + 1} is written as role/content (chat messages); this layout is "
                                     "LLaVA's: {\"from\": \"human\" | \"gpt\", \"value\": text}")
            return None
        if role not in want:
            report.add(row, "roles", f"turn {i + 1} is {role!r}, expected {want[0]!r}")
            return None
        value = t.get("value")
        if value is not None and not isinstance(value, str):
            report.add(row, "empty_turn", f"turn {i + 1} ({role}) has a value of type {type(value).__name__}, "
                                          "not text")
        elif not value or not value.strip():
            report.add(row, "empty_turn", f"turn {i + 1} ({role}) is empty")
    return turns


def check_row(rec: dict, row: str, root: Path, report: ValidationReport, questions: bool = False) -> list[Path]:
    """Check one row's structure and traces; return the image paths it uses.

    With ``questions`` (rows to evaluate on), a row may end with its question when it gives the ``answer``.
    """
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        report.add(row, "roles", "no conversations")
        return []
    turns = _check_turns(convs, row, report)
    if turns is None:
        return []
    if len(turns) % 2 and not (questions and (isinstance(rec.get("answer"), str) and rec["answer"].strip()
                                              or isinstance(rec.get("answers"), list) and rec["answers"])):
        report.add(row, "roles", "ends with a human turn that has no answer" + (
            " (neither a gpt turn nor an `answer` field)" if questions else ""))
    if rec.get("image") is not None and rec.get("images") is not None and rec["image"] != rec["images"]:
        report.add(row, "image", "both image and images are given; keep one")
    image = image_field(rec)
    images = [] if image is None else image if isinstance(image, list) else [image]
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns[::2] if isinstance(t.get("value"), str))
    if placeholders and placeholders != len(images):  # none at all is fine: images then lead the first turn
        report.add(row, "placeholders", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    for i, t in enumerate(turns[1::2]):
        if isinstance(t.get("value"), str) and t["value"].strip():
            try:
                parse_trace(t["value"])
            except TraceFormatError as err:
                report.add(row, "stage_format", f"gpt turn {i + 1}: {err.problems[0]}")
    urls = [p for p in images if isinstance(p, str) and p.startswith(("http://", "https://"))]
    if urls:
        report.add(row, "image", f"image {urls[0]} is a URL: images are read from files; download it first")
        return []
    return [root / str(p) for p in images]


def _check_all_images(to_check: list[tuple[str, object]], report: ValidationReport, workers: int = 8,
                      load=None, decode: bool = True) -> None:
    """Decode each ``(row, image)`` (``load(image)`` first when given; without ``decode``, only find it) and report
    the ones that fail.

    In a distributed run (``torch.distributed`` initialised, as under ``accelerate launch``) every process
    decodes its share of the images and all of them get every error.
    """
    def one(src):
        return _check_image(load(src) if load else src, decode=decode)

    unique = list(dict.fromkeys(src for _, src in to_check))
    world, rank = _processes()
    mine = range(rank, len(unique), world)
    with ThreadPoolExecutor(workers) as pool:
        errors = {i: e for i, e in zip(mine, pool.map(one, (unique[i] for i in mine)), strict=True) if e}
    if world > 1:
        import torch.distributed as dist

        shares: list = [None] * world
        dist.all_gather_object(shares, errors)
        errors = {i: e for share in shares for i, e in share.items()}
    bad = {unique[i]: e for i, e in errors.items()}
    for row, src in to_check:
        if src in bad:
            report.add(row, "image", bad[src])


def _processes() -> tuple[int, int]:
    """``(world size, rank)`` of the distributed run this process belongs to; ``(1, 0)`` outside one."""
    if "torch" not in sys.modules:  # torch.distributed can only be initialised once torch is imported
        return 1, 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def check_dataset(path: str | Path, image_root: str | Path | None = None, check_images: bool = True,
                  workers: int = 8, records: list | None = None, questions: bool = False,
                  decode: bool = True) -> ValidationReport:
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
    taken: dict[str, int] = {}
    counts: Counter = Counter()
    to_check: list[tuple[str, Path]] = []
    for where, rec, err in iter_records(data):
        report.rows += 1
        if rec is None:
            report.add(where, "json", err)
            continue
        row = str(rec["id"]) if rec.get("id") is not None else where
        counts[row] += 1
        if counts[row] > 1:
            report.repeated_ids[row] = counts[row]
        row = _unique_name(row, taken)  # each row keeps its own name in the report
        if records is not None:
            records.append((row, rec))
        to_check += [(row, p) for p in check_row(rec, row, root, report, questions)]
    report.images = len(to_check)
    if check_images and to_check:
        _check_all_images(to_check, report, workers, decode=decode)
    return report


def is_data_file(path: str | Path) -> bool:
    """Whether ``path`` is a LLaVA-layout file (JSON / JSON Lines), or a folder holding one, rather than a HF
    dataset (a ``save_to_disk`` folder, a parquet / arrow file, a Hub name)."""
    p = Path(path)
    if p.is_file():
        return p.suffix not in HF_FILE_TYPES
    return p.is_dir() and not _is_hf_disk(p) and bool(_data_files(p))


def _report(cfg: ValidateConfig) -> ValidationReport:
    """A data file as :func:`check_dataset` checks it; a HF dataset as training loads it. Without decoding
    (``--no_check_images``), images must still be there."""
    if is_data_file(cfg.path):
        return check_dataset(cfg.path, cfg.image_root, decode=cfg.check_images)
    from stagereason.train.data import load_rows

    return load_rows(cfg.path, cfg.image_root, skip_invalid=True, decode=cfg.check_images)[1]


def run_validate(cfg: ValidateConfig) -> int:
    """Print a summary by problem with row ids; return exit status 1 when any row is bad."""
    from stagereason.console import report as show

    rep = _report(cfg)
    by_kind = rep.by_kind()
    summary = {"path": rep.path, "rows": rep.rows, "images": rep.images, "bad_rows": len(rep.problems)}
    if rep.repeated_ids:
        shown = ", ".join(list(rep.repeated_ids)[: cfg.show])
        summary["repeated ids (not an error)"] = f"{len(rep.repeated_ids)}: {shown}"
    for kind, rows in sorted(by_kind.items()):
        more = f" (+{len(rows) - cfg.show} more)" if len(rows) > cfg.show else ""
        summary[kind] = f"{len(rows)} rows: " + ", ".join(rows[: cfg.show]) + more
    ok = rep.ok and rep.rows > 0
    if not rep.rows:
        summary["empty"] = "no rows: nothing to train or evaluate on"
    if cfg.json:
        summary = {**summary, "problems": rep.problems, "valid": ok}
    show("dataset is valid" if ok else "dataset has problems", summary, cfg.json)
    if not rep.ok and not cfg.json:
        for row, msgs in list(rep.problems.items())[: cfg.show]:
            print(f"  {row}: {msgs[0]}")
    return 0 if ok else 1
