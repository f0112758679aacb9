"""Training data: LLaVA-CoT records -> TRL vision rows (``messages`` + ``images``), images opened lazily.

Accepts a gen output dir, a ``data.jsonl`` / ``.json`` file (the published
LLaVA-CoT-100k ``train.jsonl`` loads as is, given its image root), a folder
holding one such file (image paths relative to it), or a HF dataset
(``save_to_disk`` folder or hub name) in the same layout. Every row and image
is checked here, before any model loads.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import random
import re
from pathlib import Path
from typing import Any

from stagereason.data_gen.sources import (
    HF_FILE_TYPES,
    IMAGE_PLACEHOLDER,
    _is_hf_disk,
    _open_hf,
    _unique_name,
    image_field,
)
from stagereason.data_gen.validate import (
    ValidationReport,
    _check_all_images,
    _open_pil,
    _to_rgb,
    check_dataset,
    check_row,
    is_data_file,
    resolve_data_file,
)

logger = logging.getLogger(__name__)

__all__ = ["ImageSource", "Row", "load_rows", "open_image", "split_rows", "to_dataset", "to_messages"]


@dataclasses.dataclass
class Row:
    """One training row: chat messages with image placeholders, and where its images come from."""

    id: str
    messages: list[dict]
    images: list[Any]  # paths (opened at collate time) or already-decoded images from a HF dataset
    answer: str | None  # the standard answer of the last turn, for stage-aware evaluation
    question: str = ""
    family: str | None = None
    n_tokens: int = 0


def _user_content(text: str, n_lead: int) -> list[dict]:
    """Images go where the ``<image>`` placeholders are, after ``n_lead`` images that lead the text."""
    content: list[dict] = [{"type": "image"} for _ in range(n_lead)]
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if part.strip():
            content.append({"type": "text", "text": part.strip()})
    return content


def to_messages(rec: dict, n_images: int) -> list[dict]:
    """LLaVA ``conversations`` -> chat ``messages`` (multi-turn kept; a leading system turn kept; ``\\r\\n`` read
    as ``\\n``).

    When any human turn has ``<image>`` placeholders, images go there and
    only there (validation makes their count match the images); without any,
    all ``n_images`` go before the first human turn's text.
    """
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    placed = any(IMAGE_PLACEHOLDER in t["value"] for t in rec["conversations"] if roles[t["from"]] == "user")
    messages, lead = [], 0 if placed else n_images
    for turn in rec["conversations"]:
        role = roles[turn["from"]]
        value = turn["value"].replace("\r\n", "\n").replace("\r", "\n")  # Windows line ends are no text to learn
        if role == "user":
            messages.append({"role": "user", "content": _user_content(value, lead)})
            lead = 0
        else:
            messages.append({"role": role, "content": [{"type": "text", "text": value.strip()}]})
    return messages


def _answer(rec: dict) -> str | None:
    if isinstance(rec.get("answer"), str):
        return rec["answer"]
    if isinstance(rec.get("answers"), list) and rec["answers"]:
        return str(rec["answers"][-1])
    from stagereason.stages import TraceFormatError, parse_trace

    try:
        return parse_trace(rec["conversations"][-1]["value"]).conclusion
    except (TraceFormatError, KeyError, IndexError, TypeError):
        return None


_HF_TAGS = ("hf", "hfeval")  # image references into the training / a separate eval HF dataset


def _is_hf_ref(ref) -> bool:
    return isinstance(ref, str) and ref.count(":") == 2 and ref.split(":")[0] in _HF_TAGS


def _row(rec: dict, rid: str, root: Path | None) -> Row:
    image = image_field(rec)
    images = [] if image is None else image if isinstance(image, list) else [image]
    if root is not None:
        images = [str(root / p) if isinstance(p, str) and not _is_hf_ref(p) else p for p in images]
    question = next((re.sub(r"\s*<image>\s*", " ", t["value"]).strip() for t in reversed(rec["conversations"])
                     if t.get("from") in ("human", "user")), "")
    return Row(id=rid, messages=to_messages(rec, len(images)), images=images, answer=_answer(rec),
               question=question, family=rec.get("family"))


class ImageSource:
    """Resolves a row's image reference: a file path, or ``TAG:ROW:K`` into a HF dataset (decoded on demand).

    Each HF dataset gets its own tag (``hf`` for the training data), so rows
    of a separate eval dataset resolve into their own images. HF images are
    read undecoded and handed to :func:`open_image` as ``{"bytes", "path",
    "name"}``, so an image that does not decode is named by its row.
    """

    def __init__(self, datasets: dict | None = None):
        # arrow rows as plain Python: Image cells stay {"bytes", "path"}, other columns are what is stored
        self.datasets = {tag: ds.select_columns(["image"]).with_format("arrow") for tag, ds in (datasets or {}).items()}

    def update(self, other: ImageSource) -> None:
        self.datasets.update(other.datasets)

    def __call__(self, ref):
        if _is_hf_ref(ref) and ref.split(":")[0] in self.datasets:
            tag, row, k = ref.split(":")
            cell = self.datasets[tag][int(row)].column("image")[0].as_py()
            cell = cell[int(k)] if isinstance(cell, list) else cell
            if not isinstance(cell, dict):  # not an Image feature: bytes or a path as stored
                return cell
            origin = f" ({cell['path']})" if cell.get("path") else ""
            return {**cell, "name": f"{ref} (row {row}, image {k}){origin}"}
        return ref


def _hf_meta(ds, tag: str = "hf"):
    """Rows of a HF dataset without reading its images; Image-feature cells become ``TAG:ROW:K`` references."""
    import datasets
    import pyarrow.compute as pc

    feature = ds.features.get("image")
    inner = getattr(feature, "feature", None)
    if not (isinstance(feature, datasets.Image) or isinstance(inner, datasets.Image)):
        yield from enumerate(ds)
        return
    column = ds.data.column("image")
    if isinstance(feature, datasets.Image):
        counts = [0 if null else -1 for null in column.is_null().to_pylist()]  # -1: one image, not a list
    else:  # list lengths from the arrow offsets: the image bytes are never read
        counts = [n or 0 for n in pc.list_value_length(column).to_pylist()]
    for i, rec in enumerate(ds.remove_columns(["image"])):
        n = counts[i]
        rec["image"] = (f"{tag}:{i}:0" if n == -1 else None) if n <= 0 else [f"{tag}:{i}:{k}" for k in range(n)]
        yield i, rec


def _no_local_dataset(dataset: str) -> None:
    """Refuse, without asking the Hub, a missing path that cannot be a Hub name (``runs/x`` where ``runs`` exists).

    A folder that exists goes to ``datasets.load_dataset`` (parquet, arrow or csv files load from it).
    """
    p = Path(dataset)
    if p.exists():
        return
    parts = dataset.replace("\\", "/").split("/")
    if (p.is_absolute() or dataset.startswith((".", "~")) or len(parts) != 2
            or p.suffix in (".json", ".jsonl", *HF_FILE_TYPES)
            or Path(parts[0]).is_dir()):
        raise FileNotFoundError(f"no dataset at {dataset}: it does not exist")


EVAL_SPLITS = ("test", "validation", "val", "eval", "dev")  # a separate eval dataset's split, by preference


def _load_hf(dataset: str, image_root: str | None, check_images: bool, tag: str, questions: bool = False,
             decode: bool = True):
    """Rows of a HF dataset named and checked as :func:`check_dataset` checks a file, images decoded too.

    Its ``train`` split (a separate eval dataset: its test or validation split); image paths are relative to
    ``image_root``, else to a local dataset's folder."""
    ds = _open_hf(dataset, EVAL_SPLITS if tag != "hf" else "train", None)
    if "image" not in ds.column_names and "images" in ds.column_names:
        ds = ds.rename_column("images", "image")
    source = ImageSource({tag: ds}) if "image" in ds.column_names else ImageSource()
    local = Path(dataset)
    root = Path(image_root) if image_root else (local if local.is_dir() else local.parent) if local.exists() else None
    report = ValidationReport(path=str(dataset))
    records, taken, to_check = [], {}, []
    for i, rec in _hf_meta(ds, tag):
        rid = _unique_name(str(rec["id"]) if rec.get("id") is not None else str(i), taken)  # as check_dataset names
        report.rows += 1
        for p in check_row(rec, rid, root or Path("."), report, questions):
            to_check.append((rid, p.name if _is_hf_ref(p.name) else p))
        records.append((rid, rec))
    report.images = len(to_check)
    if check_images and to_check:
        _check_all_images(to_check, report, load=lambda ref: source(ref) if isinstance(ref, str) else ref,
                          decode=decode)
    return records, report, source, root


def load_rows(dataset: str, image_root: str | None = None, *, skip_invalid: bool = False,
              check_images: bool = True, tag: str = "hf", questions: bool = False,
              decode: bool = True) -> tuple[list[Row], ValidationReport, ImageSource]:
    """Load and validate a dataset; fail fast on bad rows unless ``skip_invalid``. With ``questions`` (rows to
    evaluate on), a row may end with its question when it gives the ``answer``. ``check_images`` finds every
    image and, with ``decode``, decodes it.

    Returns:
        ``(rows, report, images)``; with ``skip_invalid`` the bad rows are left
        out and listed in ``report``; ``images`` resolves the rows' image references.

    Raises:
        ValueError: invalid rows (named in the message) and ``skip_invalid`` is off; a folder
            holding several data files.
        FileNotFoundError: no dataset at ``dataset``.
    """
    path = Path(dataset)
    if not str(dataset).strip():
        raise FileNotFoundError("no dataset given (an empty path)")
    if is_data_file(path):
        data = resolve_data_file(path)
        root = Path(image_root) if image_root else data.parent
        records = []
        report = check_dataset(data, root, check_images=check_images, records=records, questions=questions,
                               decode=decode)
        source = ImageSource()
    elif _is_hf_disk(path):
        records, report, source, root = _load_hf(dataset, image_root, check_images, tag, questions, decode)
    elif path.is_file():  # a parquet / arrow file
        try:
            records, report, source, root = _load_hf(dataset, image_root, check_images, tag, questions, decode)
        except (OSError, ValueError) as err:  # pyarrow's errors name no file
            raise ValueError(f"{dataset} cannot be read as a {HF_FILE_TYPES[path.suffix]} file ({type(err).__name__}: "
                             f"{err})") from err
    else:
        _no_local_dataset(dataset)
        try:
            records, report, source, root = _load_hf(dataset, image_root, check_images, tag, questions, decode)
        except (OSError, ValueError) as err:  # datasets' errors: connection, not found, gated, unknown files...
            what = ("a folder without a data.jsonl / .jsonl / .json file or a saved HF dataset, and datasets could "
                    "not load it" if path.is_dir() else "not a local file or folder, and loading it as a Hub "
                    "dataset failed")
            raise FileNotFoundError(f"no dataset at {dataset}: {what} ({type(err).__name__}: {err})") from err
    bad = set(report.problems)
    if bad and not skip_invalid:
        shown = "; ".join(f"{row}: {msgs[0]}" for row, msgs in list(report.problems.items())[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{len(bad)} invalid row(s) in {report.path}: {shown}{more}. "
                         "Fix them (stagereason validate lists all) or pass --skip_invalid to drop them")
    if bad:
        shown = "; ".join(f"{row}: {msgs[0]}" for row, msgs in list(report.problems.items())[:3])
        logger.warning("dropped %d invalid row(s) of %s (--skip_invalid): %s%s", len(bad), report.path, shown,
                       " ..." if len(bad) > 3 else "")
    # records are named as the report names them (a repeated id is a distinct row: ``id#1``...)
    rows = [_row(rec, name, root) for name, rec in records if name not in bad]
    return rows, report, source


def split_rows(rows: list[Row], eval_split: str | float | None, seed: int, image_root: str | None = None,
               source: ImageSource | None = None, *, skip_invalid: bool = False):
    """``eval_split`` is a fraction (``0.05``), a row count (``200``), a dataset path, or empty for none.

    A fraction or count holds out whole groups of rows that share their images (rows without an image: their
    question and answer), as many as fit in that many rows, so that no held-out image was trained on.

    A separate eval dataset is loaded as :func:`load_rows` loads the training
    data (its invalid rows dropped with ``skip_invalid``, else an error); its
    images are added to ``source`` (under their own tag).
    """
    if eval_split in (None, "", 0, "none"):
        return rows, []
    try:
        frac = float(eval_split)
    except (TypeError, ValueError):
        eval_rows, report, eval_source = load_rows(str(eval_split), image_root, skip_invalid=skip_invalid,
                                                   tag="hfeval")
        if not eval_rows:
            raise ValueError(f"--eval_split {eval_split}: no {'valid ' if report.rows else ''}rows in it "
                             f"({report.rows} read); give held-out rows, or --eval_split none") from None
        if source is not None:
            source.update(eval_source)
        _check_overlap(rows, eval_rows, eval_split)
        return rows, eval_rows
    if frac == 0:
        return rows, []
    n = int(round(frac * len(rows))) if frac < 1 else int(frac)
    if not 0 < n < len(rows):
        raise ValueError(f"--eval_split {eval_split} leaves no training or no eval rows out of {len(rows)}: give a "
                         "row count (e.g. --eval_split 1) or --eval_split none")
    # rows about the same images (several questions on one image), or the same text-only question and answer,
    # stay on one side: no held-out image or row was trained on. Whole groups are held out while they fit in n.
    order = _row_groups(rows)
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for group in order:
        if len(held) + len(group) <= n:
            held.update(group)
        if len(held) == n:
            break
    if not held:  # every group is larger than n: by row, the groups then on both sides
        logger.warning("--eval_split %s: every group of rows about one image holds more than %d rows; held-out rows "
                       "are drawn one by one, so their images are also trained on", eval_split, n)
        held = set(itertools.islice(itertools.chain.from_iterable(order), n))
    elif len(held) < n:
        logger.info("--eval_split %s: %d rows held out (whole groups of rows about one image fit no closer to %d)",
                    eval_split, len(held), n)
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _image_key(image) -> str:
    """An image reference to compare: a path normalised (``a/./x.png`` is ``a/x.png``), else as written."""
    return os.path.normpath(image) if isinstance(image, str) and not _is_hf_ref(image) else str(image)


def _row_groups(rows: list[Row]) -> list[list[int]]:
    """Row indices grouped so that rows sharing any image (paths compared once normalised: ``a/./x.png`` is
    ``a/x.png``; a row of several images joins their groups), or text-only rows with the same question and
    answer, are in one group; in the rows' order."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for i, r in enumerate(rows):
        keys = [("image", _image_key(x)) for x in r.images] if r.images else [("text", r.question, r.answer)]
        for key in keys:
            j = first.setdefault(key, i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _check_overlap(train: list[Row], held_out: list[Row], eval_split) -> None:
    """Rows of a separate eval dataset that are training rows too (the same question about the same images, the
    same answer) measure recall, not generalisation: all of them is an error (the training data given as the eval
    split), some a warning."""
    def key(r: Row):
        return r.question, tuple(map(_image_key, r.images)), r.answer

    seen = {key(r) for r in train}
    both = [r for r in held_out if key(r) in seen]
    if both and len(both) == len(held_out):
        raise ValueError(f"--eval_split {eval_split}: every held-out row is also a training row (the same question, "
                         "images and answer): is it the training data? give rows kept out of training")
    if both:
        logger.warning("%d of %d held-out rows (--eval_split %s) are also training rows, the same question, images "
                       "and answer (e.g. %s): their evaluation is of recall", len(both), len(held_out), eval_split,
                       both[0].id)


def fit_tiles(im, tile: int, most: int):
    """Shrink ``im`` just enough that Mllama's processor gives it at most ``most`` tiles of ``tile`` pixels.

    The processor picks the canvas (rows x columns of tiles) that fits the
    image with the least upscaling, else the least downscaling. An image that
    fits some canvas of at most ``most`` tiles unscaled already gets one of at
    most that many (the smallest canvas that contains it); otherwise it is
    shrunk to fit the canvas of at most ``most`` tiles that keeps it largest.
    The model still pads to its own tile count, so its inputs keep their shape.
    """
    h, w = im.height, im.width
    canvases = [(r, c) for r in range(1, most + 1) for c in range(1, most + 1) if r * c <= most]
    scale = max(min(r * tile / h, c * tile / w) for r, c in canvases)
    if scale >= 1:
        return im
    return im.resize((max(1, int(w * scale)), max(1, int(h * scale))))


def _thumbnail_size(w: int, h: int, side: int) -> tuple[int, int]:
    """The size PIL's ``thumbnail((side, side))`` gives a ``w`` x ``h`` image (same rounding)."""
    aspect = w / h

    def nearest(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if aspect <= 1:
        return nearest(side * aspect, key=lambda n: abs(aspect - n / side)), side
    return side, nearest(side / aspect, key=lambda n: 0 if n == 0 else abs(aspect - side / n))


def image_size(src, max_side: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of the image :func:`open_image` gives for ``src``, from its header (nothing decoded).

    Raises:
        Whatever opening ``src`` raises (validation has named bad images before this is asked).
    """
    from PIL import ExifTags, Image

    im = src if isinstance(src, Image.Image) else _open_pil(src)
    w, h = im.size
    try:
        turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn: sides swap
    except Exception:  # noqa: BLE001 - unreadable EXIF: shown as stored, as _to_rgb does
        turned = False
    if im is not src:
        im.close()
    if turned:
        w, h = h, w
    if max_side and max(w, h) > max_side:
        w, h = _thumbnail_size(w, h, max_side)
    return w, h


def open_image(src, max_side: int | None = None, tiles: tuple[int, int] | None = None):
    """Open one image (path, bytes, HF image dict or PIL) as RGB, cap its longest side and (``(tile, most)``) its tiles.

    Decoded as validation decodes it: EXIF orientation applied first,
    transparency composited over white, 16-bit grey scaled to 8 bits; an
    image past PIL's "decompression bomb" size is read (and shrunk), not refused.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: data that does not decode as an image, whatever PIL raised (the image is named).
    """
    from PIL import Image

    name = "<bytes>" if isinstance(src, (bytes, bytearray, dict)) else str(src)
    if isinstance(src, dict):  # HF Image feature without decoding (``name``: where it came from)
        name = src.get("name") or src.get("path") or name
    elif not isinstance(src, (Image.Image, bytes, bytearray)) and not Path(src).is_file():
        why = ("is a folder, not an image file" if Path(src).is_dir()
               else "is a URL: images are read from files; download it first" if str(src).startswith(
                   ("http://", "https://")) else "does not exist")
        raise FileNotFoundError(f"image {src} {why}")
    try:
        raw = src if isinstance(src, Image.Image) else _open_pil(src)
        if max_side and max(raw.size) > max_side and raw.format == "JPEG":
            raw.draft("RGB", (max_side, max_side))  # decode big JPEGs at reduced scale
        im = _to_rgb(raw)  # decodes (as validation does); a corrupt file fails here
        if raw is not src:
            raw.close()
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"image {name} cannot be read ({type(err).__name__}: {err})") from err
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    return fit_tiles(im, *tiles) if tiles else im


def to_dataset(rows: list[Row]):
    """Rows as TRL expects them: a ``datasets.Dataset`` of ``messages`` and ``images``.

    Images stay references (file paths, or ``hf:ROW:K`` into a HF dataset)
    until collate time, so a 100k-image dataset never sits in memory.
    """
    import datasets

    return datasets.Dataset.from_dict({
        "messages": [r.messages for r in rows],
        "images": [[str(s) for s in r.images] for r in rows],
        "length": [r.n_tokens for r in rows],  # for train_sampling_strategy=group_by_length
    })
