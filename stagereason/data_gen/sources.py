"""VQA sources -> ``Example``: LLaVA JSON/JSONL, anything ``datasets`` opens, procedural scenes.

A source never raises on one bad row: the row becomes an ``Example`` with
``error`` set (a reason naming the row), the runner rejects it, and the run
goes on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stagereason.data_gen.records import iter_records

__all__ = ["Example", "Turn", "llava_examples", "hf_examples", "synthetic_examples", "IMAGE_PLACEHOLDER"]

IMAGE_PLACEHOLDER = "<image>"
_HUMAN, _GPT = ("human", "user"), ("gpt", "assistant")


@dataclasses.dataclass
class Turn:
    """One question and its standard answer; ``human`` is the source's text as written."""

    question: str
    answer: str
    human: str


@dataclasses.dataclass
class Example:
    """One source row. ``images`` hold paths, PIL images or bytes.

    ``error`` is set when the row cannot be used (missing image, bad JSON,
    wrong roles, missing answer): the runner rejects it with that reason.
    """

    id: str
    images: list[Any]
    turns: list[Turn]
    hints: list[str] = dataclasses.field(default_factory=list)
    choices: dict[str, str] | None = None
    image_names: list[str] = dataclasses.field(default_factory=list)  # relative names for OUT/images/
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other source fields, kept in the output
    trace: str | None = None  # a ready trace (procedural scenes): no teacher needed
    error: str | None = None
    single_image_field: bool = True  # the source wrote `image` as one string, not a list


def image_field(row: dict):
    """A row's image field as written: ``image`` (one path or a list), else ``images`` (the name ShareGPT and
    LLaMA-Factory data use)."""
    return row["image"] if row.get("image") is not None else row.get("images")


def _unique_name(rid: str, taken: dict[str, int]) -> str:
    """``rid``, else the first free ``rid#1``, ``rid#2``...: unique against every name given so far.

    ``taken`` maps each name given to the next suffix to try, so ids that
    already look like ``x#1`` never collide with a renamed repeat of ``x``.
    """
    if rid not in taken:
        taken[rid] = 1
        return rid
    n = taken[rid]
    while f"{rid}#{n}" in taken:
        n += 1
    taken[rid] = n + 1
    name = f"{rid}#{n}"
    taken[name] = 1
    return name


def _strip_placeholder(text: str) -> str:
    return re.sub(r"\s*<image>\s*", "\n", text).strip()


def _as_hints(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [str(v) for v in value if str(v).strip()]


def _as_choices(value) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return {chr(ord("A") + i): str(v) for i, v in enumerate(value)} or None
    raise ValueError(f"choices must be a list or a mapping, got {type(value).__name__}")


def _llava_row(row: dict, where: str, image_root: Path, seen: dict[str, int]) -> Example:
    rid = str(row["id"]) if row.get("id") is not None else where
    key = _unique_name(rid, seen)  # duplicate ids in a source stay distinct records
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "images", "conversations", "hints", "choices")}
    ex = Example(id=key, images=[], turns=[], hints=_as_hints(row.get("hints")), extra=extra)
    try:
        ex.choices = _as_choices(row.get("choices"))
    except ValueError as err:
        ex.error = f"row {rid!r} ({where}): {err}"
        return ex
    image = image_field(row)
    ex.single_image_field = not isinstance(image, list)
    names = [] if image is None else image if isinstance(image, list) else [image]
    ex.image_names = [str(x) for x in names]
    ex.images = [image_root / x for x in ex.image_names]
    convs = row.get("conversations")
    if not isinstance(convs, list) or not convs:
        ex.error = f"row {rid!r} ({where}): no conversations"
        return ex
    turns = [t for t in convs if not (isinstance(t, dict) and t.get("from") == "system")]
    for i, t in enumerate(turns):
        want = _HUMAN if i % 2 == 0 else _GPT
        role = t.get("from") if isinstance(t, dict) else None
        if role not in want:
            ex.error = f"row {rid!r} ({where}): wrong roles: turn {i + 1} is {role!r}, expected {want[0]!r}"
            return ex
    if len(turns) % 2:
        ex.error = f"row {rid!r} ({where}): wrong roles: ends with a human turn that has no answer"
        return ex
    for i in range(0, len(turns), 2):
        human, answer = turns[i].get("value"), turns[i + 1].get("value")
        if not isinstance(human, str) or not human.strip():
            ex.error = f"row {rid!r} ({where}): empty question in turn {i + 1}"
            return ex
        if not isinstance(answer, str) or not answer.strip():
            ex.error = f"row {rid!r} ({where}): missing answer in turn {i + 2}"
            return ex
        ex.turns.append(Turn(question=_strip_placeholder(human), answer=answer.strip(), human=human))
    return ex


def llava_examples(path: str | Path, image_root: str | Path | None = None) -> Iterator[Example]:
    """Read LLaVA-style JSON (a list) or JSONL.

    Rows: ``id``, ``image`` (relative to ``image_root``, or a list of them),
    ``conversations`` alternating ``human``/``gpt`` (an optional leading
    ``system`` turn is skipped), optional ``hints`` and ``choices`` (a list
    or a letter -> text mapping). Every gpt turn is a
    target. Other fields are kept. A bad JSON line or row yields an Example
    with ``error`` set.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a JSON list that does not parse, or a ``.json`` file holding one object (``iter_records``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source file {path} does not exist")
    root = Path(image_root) if image_root else path.parent
    seen: dict[str, int] = {}
    for where, row, err in iter_records(path):
        if err:
            yield Example(id=where.replace(" ", "-"), images=[], turns=[], error=f"bad JSON: {err}")
            continue
        yield _llava_row(row, where, root, seen)


def _hf_image(value) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):  # datasets Image feature without decoding
        return value.get("bytes") or value.get("path")
    return value


_HF_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what ``save_to_disk`` writes


def _is_hf_disk(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets`` ``save_to_disk``."""
    return any((Path(path) / name).is_file() for name in _HF_DISK_FILES)


HF_FILE_TYPES = {".parquet": "parquet", ".arrow": "arrow"}  # single data files ``datasets`` reads as tables


def _open_hf(path: str, split: str | tuple[str, ...], name: str | None):
    """One split of a HF dataset: a ``save_to_disk`` folder, a parquet / arrow file, or what ``load_dataset``
    opens. ``split`` may list names in order of preference; a dataset with one split alone gives that one.

    Raises:
        ValueError: a dataset with several splits, none of them named in ``split`` (its splits are named).
    """
    import datasets

    want = (split,) if isinstance(split, str) else tuple(split)
    p = Path(path)
    if p.is_file() and p.suffix in HF_FILE_TYPES:
        return datasets.load_dataset(HF_FILE_TYPES[p.suffix], data_files=str(p), split="train")
    if _is_hf_disk(p):
        ds = datasets.load_from_disk(str(p))
        return ds[_pick_split(list(ds), want, path)] if isinstance(ds, datasets.DatasetDict) else ds
    if len(want) == 1:
        return datasets.load_dataset(path, name, split=want[0])
    # the split's name first: only the split used is prepared
    return datasets.load_dataset(path, name, split=_pick_split(datasets.get_dataset_split_names(path, name), want,
                                                               path))


def _pick_split(names: list[str], want: tuple[str, ...], path: str) -> str:
    """The first of ``want`` among a dataset's split ``names``, else its one split."""
    found = next((s for s in want if s in names), names[0] if len(names) == 1 else None)
    if found is None:
        raise ValueError(f"{path} holds the splits {', '.join(names)}, none of them {' or '.join(want)}: save the "
                         "split to use on its own")
    return found


def hf_examples(path: str, *, split: str = "train", name: str | None = None, id_column: str | None = None,
                image_column: str = "image", question_column: str = "question", answer_column: str = "answer",
                choices_column: str | None = None, hints_column: str | None = None) -> Iterator[Example]:
    """Rows of a Hugging Face dataset (hub name, local script/files, or a ``save_to_disk`` folder).

    Choices given as a list become options A, B, C, ...; an integer answer
    with choices is taken as the index of the right option and becomes its letter.

    Raises:
        ValueError: a named column is not in the dataset.
    """
    import datasets

    ds = _open_hf(path, split, name)
    if isinstance(ds.features.get(image_column), datasets.Image):
        # the file's own bytes (often a JPEG), not a decoded image re-encoded as PNG for every request
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    cols = set(ds.column_names)
    for label, col in (("question", question_column), ("answer", answer_column), ("image", image_column),
                       ("choices", choices_column), ("hints", hints_column), ("id", id_column)):
        if col is not None and col not in cols and not (label == "image" and col == "image"):
            raise ValueError(f"--{label}_column {col!r} is not a column of {path}; columns: {sorted(cols)}")
    used = {image_column, question_column, answer_column, choices_column, hints_column, id_column}
    seen: dict[str, int] = {}
    for i, row in enumerate(ds):
        rid = str(row[id_column]) if id_column else f"{i:07d}"
        key = _unique_name(rid, seen)
        ex = Example(id=key, images=[], turns=[], extra={k: v for k, v in row.items()
                                                          if k not in used and _jsonable(v)})
        image = _hf_image(row.get(image_column))
        ex.images = [] if image is None else [image]
        # a stored file keeps its suffix; bytes are named by the format they are written in (gen's _Writer)
        suffix = (Path(image).suffix or ".png") if isinstance(image, (str, Path)) else ".png"
        ex.image_names = [f"{_safe(key)}{suffix}"] if image is not None else []
        question, answer = row.get(question_column), row.get(answer_column)
        try:
            ex.choices = _as_choices(row.get(choices_column)) if choices_column else None
        except ValueError as err:
            ex.error = f"row {key!r}: {err}"
        ex.hints = _as_hints(row.get(hints_column)) if hints_column else []
        if ex.choices and isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(ex.choices):
            answer = list(ex.choices)[answer]  # an index into the options (ScienceQA-style) becomes its letter
        if not isinstance(question, str) or not question.strip():
            ex.error = f"row {key!r}: empty question"
        elif answer is None or not str(answer).strip():
            ex.error = f"row {key!r}: missing answer"
        else:
            human = _with_choices(question.strip(), ex.choices)
            ex.turns = [Turn(question=human, answer=str(answer).strip(), human=human)]
        yield ex


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:150]


def _with_choices(question: str, choices: dict[str, str] | None) -> str:
    if not choices:
        return question
    return question + "\nOptions:\n" + "\n".join(f"{k}. {v}" for k, v in choices.items())


def synthetic_examples(n: int, seed: int = 0, difficulty: int = 1, image_size: int = 128,
                       families: tuple[str, ...] | None = None, skip: set[str] | None = None) -> Iterator[Example]:
    """Procedural scenes (see :mod:`stagereason.data_gen.scenes`) as Examples with ready traces.

    Ids in ``skip`` (a resumed run's finished examples) are not drawn at all.
    """
    from stagereason.data_gen.scenes import FAMILIES, make_example, scene_id

    for i in range(n):
        if skip and scene_id(seed, i) in skip:
            continue
        s = make_example(seed, i, difficulty=difficulty, image_size=image_size, families=families or FAMILIES)
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        yield Example(
            id=s.id, images=[buf.getvalue()], image_names=[f"{s.id}.png"],
            turns=[Turn(question=s.question, answer=s.answer, human=s.question)], choices=s.choices,
            extra={"family": s.family, "difficulty": s.difficulty}, trace=s.trace.render(),
        )
