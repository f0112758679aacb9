"""``stagereason gen``: a resumable, crash-safe run from a source, through a teacher, to verified traces.

setup (out dir, repair, what is done) -> run (async workers, bounded
concurrency) -> save (stats.json, optional HF dataset, summary).

Output in ``--out``:
    data.jsonl     accepted records, LLaVA-CoT-100k layout
    images/        their images (hard-linked or copied; in-memory images as PNG)
    rejects.jsonl  {id, reason, raw, attempts} for every example that failed
    stats.json     totals by outcome and reason, tokens, requests, retries, throughput
    gen_job.json   what defines the job, checked when the same command runs again
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import filecmp
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from stagereason.data_gen.records import JsonlAppender, atomic_write_text, iter_jsonl, repair_tail
from stagereason.data_gen.sources import Example, hf_examples, llava_examples, synthetic_examples
from stagereason.data_gen.verify import check_trace

__all__ = ["GenConfig", "run_gen"]

logger = logging.getLogger(__name__)
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}


def _f(default=dataclasses.MISSING, help="", **kw):  # noqa: A002 - argparse's word
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass
class GenConfig:
    """Options of ``stagereason gen``."""

    out: str = _f(help="Output directory. Running the same command again resumes it.")
    source: Literal["synthetic", "llava", "hf"] = _f("synthetic", help="synthetic: procedural scenes (no teacher); "
                                                     "llava: LLaVA JSON/JSONL; hf: a datasets dataset.")
    data: str | None = _f(None, help="llava: the JSON/JSONL file; hf: a hub name, local path or save_to_disk dir.")
    image_root: str | None = _f(None, help="llava: folder the rows' `image` paths are relative to "
                                           "(default: the data file's folder).")
    limit: int | None = _f(None, help="Use only the first N source rows.")
    # synthetic
    n: int = _f(1000, help="synthetic: number of examples (raising it later extends the set).")
    seed: int = _f(0, help="synthetic: seed of the set.")
    difficulty: int = _f(1, help="synthetic: 1 (easy) to 3 (more objects, colours, shapes, sizes).")
    image_size: int = _f(128, help="synthetic: image side in pixels.")
    families: list[str] = _f(default_factory=list, help="synthetic: question families to use (default: all of "
                             "count attribute spatial compare arithmetic chart).")
    # hf
    split: str = _f("train", help="hf: split to read.")
    hf_config: str | None = _f(None, help="hf: dataset configuration name.")
    id_column: str | None = _f(None, help="hf: id column (default: the row index).")
    image_column: str = _f("image", help="hf: image column (PIL image, bytes or path).")
    question_column: str = _f("question", help="hf: question column.")
    answer_column: str = _f("answer", help="hf: standard answer column.")
    choices_column: str | None = _f(None, help="hf: multiple-choice options column (list or mapping).")
    hints_column: str | None = _f(None, help="hf: hints column (string or list), passed to the teacher verbatim.")
    # teacher
    teacher_base_url: list[str] = _f(default_factory=list, help="OpenAI-compatible endpoint(s), e.g. "
                                     "http://localhost:8000/v1; several are used round-robin.")
    teacher_model: str | None = _f(None, help="Model name to ask the teacher for.")
    api_key_env: str = _f("OPENAI_API_KEY", help="Environment variable holding the API key (never logged).")
    concurrency: int = _f(64, help="Requests in flight at once.")
    timeout: float = _f(120.0, help="Seconds per request before it is retried.")
    max_retries: int = _f(8, help="Transport retries per request (429/5xx/timeouts); not counted as attempts.")
    backoff: float = _f(0.5, help="First retry wait in seconds; doubles per retry, with jitter.")
    temperature: float = _f(0.7, help="Teacher sampling temperature.")
    max_tokens: int = _f(2048, help="Teacher max tokens per trace.")
    max_attempts: int = _f(3, help="Tries per example (a bad trace is one try) before it goes to rejects.")
    judge: bool = _f(False, help="Ask the teacher whether a conclusion that does not match the standard answer "
                                 "agrees with it anyway.")
    language: str = _f("en", help="Language code for the stage contents (tags stay as they are), e.g. ja.")
    prompt_template: str | None = _f(None, help="Teacher prompt template (default: the packaged "
                                                "data_gen/prompts/teacher.txt).")
    judge_template: str | None = _f(None, help="Judge prompt template (default: data_gen/prompts/judge.txt).")
    retry_teacher_errors: bool = _f(False, help="On resume, send again the examples rejected for teacher_error.")
    copy_images: bool = _f(False, help="Copy images into OUT/images instead of hard-linking them.")
    hf_out: str | None = _f(None, help="Also save the accepted records as a HF dataset (save_to_disk) here.")
    progress: bool = _f(True, help="Show a live progress bar.")
    json: bool = _f(False, help="Print the summary as one JSON object.")

    def __post_init__(self):
        if self.source != "synthetic" and not self.data:
            raise ValueError(f"--data is required with --source {self.source}")
        if self.source != "synthetic" and not (self.teacher_base_url and self.teacher_model):
            raise ValueError(f"--source {self.source} needs a teacher: --teacher_base_url and --teacher_model")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("--concurrency and --max_attempts must be at least 1")


_JOB_KEYS = ("source", "data", "image_root", "seed", "difficulty", "image_size", "families", "split", "hf_config",
             "id_column", "image_column", "question_column", "answer_column", "choices_column", "hints_column",
             "language", "teacher_model")


def _job(cfg: GenConfig) -> dict:
    job = {k: getattr(cfg, k) for k in _JOB_KEYS}
    if cfg.source == "synthetic":
        from stagereason.data_gen.scenes import VERSION

        job["scenes_version"] = VERSION
    for k in ("data", "image_root"):
        if job[k] and Path(job[k]).exists():
            job[k] = str(Path(job[k]).resolve())
    return job


def _prepare_out(out: Path, job: dict) -> None:
    job_file = out / "gen_job.json"
    if job_file.is_file():
        old = json.loads(job_file.read_text())
        diff = [f"{k}: {old.get(k)!r} then, {job[k]!r} now" for k in job if old.get(k) != job[k]]
        if diff:
            raise FileExistsError(f"{out} holds a different gen job ({'; '.join(diff)}); "
                                  "use another --out, or the same options to resume")
        return
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise FileExistsError(f"output directory {out} is not empty and was not made by stagereason gen; "
                              "choose another --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    atomic_write_text(job_file, json.dumps(job, indent=2) + "\n")


def _source(cfg: GenConfig, done: set[str]):
    if cfg.source == "synthetic":
        n = cfg.n if cfg.limit is None else min(cfg.n, cfg.limit)
        return synthetic_examples(n, cfg.seed, cfg.difficulty, cfg.image_size, tuple(cfg.families) or None,
                                  skip=done), n
    if cfg.source == "llava":
        it = llava_examples(cfg.data, cfg.image_root)
    else:
        it = hf_examples(cfg.data, split=cfg.split, name=cfg.hf_config, id_column=cfg.id_column,
                         image_column=cfg.image_column, question_column=cfg.question_column,
                         answer_column=cfg.answer_column, choices_column=cfg.choices_column,
                         hints_column=cfg.hints_column)
    if cfg.limit is not None:
        import itertools

        it = itertools.islice(it, cfg.limit)
    return it, None


def _load_image(src) -> tuple[bytes, str]:
    """Open and fully decode one image; return bytes to send/save and their PIL format."""
    from PIL import Image

    if isinstance(src, Image.Image):
        buf = io.BytesIO()
        src.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "PNG"
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"missing image {path}")
        data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or "PNG"
        im.load()
        if fmt not in _MIME:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return buf.getvalue(), "PNG"
    return data, fmt


def _prepare_images(ex: Example) -> list[tuple[bytes, str]]:
    out = []
    for i, src in enumerate(ex.images):
        try:
            out.append(_load_image(src))
        except FileNotFoundError as err:
            raise ValueError(f"bad_input: {err}") from None
        except Exception as err:  # PIL raises many types for corrupt data
            name = ex.image_names[i] if i < len(ex.image_names) else f"image {i}"
            raise ValueError(f"bad_input: corrupt image {name} ({type(err).__name__}: {err})") from None
    return out


def _safe_rel(name: str) -> Path:
    parts = [p for p in Path(name).parts if p not in ("", ".", "..", "/") and not p.endswith(":\\")]
    return Path(*parts) if parts else Path("image")


def _same_image(dst: Path, src, payload: bytes) -> bool:
    """Whether ``dst`` already holds this image (a hard link to it, or the same bytes)."""
    if isinstance(src, (str, Path)):
        try:
            return os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)
        except OSError:
            return False
    return dst.read_bytes() == payload


class _Writer:
    """Writes accepted records (images first, then the line) and rejects; counts outcomes."""

    def __init__(self, out: Path, copy_images: bool):
        self.out, self.copy_images = out, copy_images
        self.data = JsonlAppender(out / "data.jsonl")
        self.rejects = JsonlAppender(out / "rejects.jsonl")
        self.counts: Counter = Counter()

    def _put_image(self, ex: Example, i: int, payload: bytes, fmt: str) -> str:
        rel = Path("images") / _safe_rel(ex.image_names[i] if i < len(ex.image_names) else f"{ex.id}-{i}.png")
        src = ex.images[i]
        if not isinstance(src, (str, Path)):  # the payload is written: its name says its format
            rel = rel.with_suffix(_SUFFIX[fmt])
        dst = self.out / rel
        if dst.exists() and not _same_image(dst, src, payload):
            # another image already has this name (`a/../x.png` vs `x.png`, ids that sanitise alike):
            # a name from the content keeps both, and the same image gets the same name on a rerun
            data = Path(src).read_bytes() if isinstance(src, (str, Path)) else payload
            rel = rel.with_name(f"{rel.stem}-{hashlib.sha1(data).hexdigest()[:12]}{rel.suffix}")
            dst = self.out / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            linked = False
            if isinstance(src, (str, Path)) and not self.copy_images:
                try:
                    os.link(src, tmp)
                    linked = True
                except OSError:
                    linked = False
            if not linked:
                if isinstance(src, (str, Path)):
                    shutil.copyfile(src, tmp)
                else:
                    tmp.write_bytes(payload)
            os.replace(tmp, dst)
        return rel.as_posix()

    def accept(self, ex: Example, images: list[tuple[bytes, str]], traces: list[str], attempts: int) -> None:
        paths = [self._put_image(ex, i, payload, fmt) for i, (payload, fmt) in enumerate(images)]
        convs = []
        for turn, trace in zip(ex.turns, traces, strict=True):
            convs += [{"from": "human", "value": turn.human}, {"from": "gpt", "value": trace}]
        rec = {"id": ex.id}
        if paths:
            rec["image"] = paths[0] if ex.single_image_field and len(paths) == 1 else paths
        rec["conversations"] = convs
        answers = [t.answer for t in ex.turns]
        rec["answer" if len(answers) == 1 else "answers"] = answers[0] if len(answers) == 1 else answers
        if ex.hints:
            rec["hints"] = ex.hints
        if ex.choices:
            rec["choices"] = ex.choices
        rec.update({k: v for k, v in ex.extra.items() if k not in rec})
        self.data.write(rec)
        self.counts["accepted"] += 1
        self.counts[f"attempts_{attempts}"] += 1

    def reject(self, ex: Example, reason: str, raw: str | None, attempts: int) -> None:
        self.rejects.write({"id": ex.id, "reason": reason, "raw": raw, "attempts": attempts})
        self.counts["rejected"] += 1
        self.counts["reason:" + reason.split(":", 1)[0]] += 1

    def close(self) -> None:
        self.data.close()
        self.rejects.close()


def _done_ids(out: Path, retry_teacher_errors: bool) -> tuple[set[str], int]:
    """Ids already accepted or rejected (after repairing partial tails). Returns (ids, bytes repaired)."""
    repaired = 0
    done: set[str] = set()
    for name in ("data.jsonl", "rejects.jsonl"):
        path = out / name
        repaired += repair_tail(path)
        if not path.is_file():
            continue
        keep_lines, dropped = [], 0
        for _, rec, _ in iter_jsonl(path):
            if name == "rejects.jsonl" and retry_teacher_errors and str(rec.get("reason", "")).startswith(
                    "teacher_error"):
                dropped += 1
                continue
            done.add(str(rec["id"]))
            keep_lines.append(rec)
        if dropped:  # rewrite rejects without the ones to send again
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep_lines))
    return done, repaired


async def _process(ex: Example, cfg: GenConfig, teacher, templates, writer: _Writer, stats: Counter) -> None:
    from stagereason.data_gen.prompts import judge_messages, teacher_messages
    from stagereason.data_gen.teacher import TeacherConfigError, TeacherError

    if ex.error:
        writer.reject(ex, f"bad_input: {ex.error}", None, 0)
        return
    try:
        images = await asyncio.to_thread(_prepare_images, ex) if teacher else _prepare_images(ex)
    except ValueError as err:
        writer.reject(ex, str(err), None, 0)
        return
    if ex.trace is not None:  # procedural: the trace is exact; verify it all the same
        verdict = check_trace(ex.trace, ex.turns[0].answer, ex.choices)
        if verdict.ok:
            writer.accept(ex, images, [verdict.trace.render()], 1)
        else:
            writer.reject(ex, verdict.reason, ex.trace, 1)
        return
    urls = [f"data:{_MIME[fmt]};base64,{base64.b64encode(data).decode()}" for data, fmt in images]
    traces, attempts_used = [], 0
    for turn in ex.turns:
        raw, reason, accepted = None, None, None
        for attempt in range(1, cfg.max_attempts + 1):
            attempts_used = max(attempts_used, attempt)
            try:
                raw = await teacher.chat(teacher_messages(templates["teacher"], ex, turn, urls, cfg.language))
                verdict = check_trace(raw, turn.answer, ex.choices)
                if verdict.needs_judge and cfg.judge:
                    stats["judge_calls"] += 1
                    said = await teacher.chat(judge_messages(templates["judge"], turn.question, turn.answer,
                                                             verdict.trace.conclusion), max_tokens=8, temperature=0)
                    if said.strip().lower().startswith("yes"):
                        stats["judge_accepted"] += 1
                        verdict.ok = True
            except TeacherConfigError:
                raise
            except TeacherError as err:  # transport retries exhausted: more attempts would only hammer it
                writer.reject(ex, f"teacher_error: {err}", raw, attempt)
                return
            if verdict.ok:
                accepted = verdict.trace.render()
                break
            reason = verdict.reason
        if accepted is None:
            writer.reject(ex, reason, raw, attempts_used)
            return
        traces.append(accepted)
    writer.accept(ex, images, traces, attempts_used)


def _progress(cfg: GenConfig, total: int | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]gen[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:.1f} rec/s"), TimeRemainingColumn(),
                    TextColumn("accept {task.fields[accept]:.0%}"),
                    console=Console(stderr=True), disable=not cfg.progress, transient=False)


async def _run_all(todo, cfg: GenConfig, teacher, templates, writer: _Writer, stats: Counter, on_done) -> None:
    fatal: list[BaseException] = []

    async def worker():
        while not fatal:
            ex = next(todo, None)
            if ex is None:
                return
            try:
                await _process(ex, cfg, teacher, templates, writer, stats)
            except Exception as err:  # a config error (401/404) stops every worker
                fatal.append(err)
                return
            on_done()

    n_workers = cfg.concurrency if teacher else 1
    await asyncio.gather(*(worker() for _ in range(n_workers)))
    if teacher:
        await teacher.aclose()
    if fatal:
        raise fatal[0]


def _totals(out: Path) -> dict:
    accepted = sum(1 for _ in iter_jsonl(out / "data.jsonl")) if (out / "data.jsonl").is_file() else 0
    reasons: Counter = Counter()
    if (out / "rejects.jsonl").is_file():
        for _, rec, _ in iter_jsonl(out / "rejects.jsonl"):
            reasons[str(rec.get("reason", "")).split(":", 1)[0]] += 1
    return {"accepted": accepted, "rejected": sum(reasons.values()), "reject_reasons": dict(sorted(reasons.items()))}


def _check_hf_out(hf_out: str) -> None:
    """``--hf_out`` may hold a saved dataset (this job's, replaced on each run), never anything else."""
    path = Path(hf_out)
    if path.is_file():
        raise FileExistsError(f"--hf_out {path} is a file; choose another --hf_out")
    if path.is_dir() and any(path.iterdir()) and not (path / "dataset_info.json").is_file():
        raise FileExistsError(f"--hf_out {path} is not empty and holds no saved dataset; choose another --hf_out")


def _save_hf(out: Path, hf_out: str) -> None:
    import datasets

    from stagereason.fsio import atomic_dir

    rows = [rec for _, rec, _ in iter_jsonl(out / "data.jsonl")]
    for rec in rows:
        img = rec.get("image")
        if isinstance(img, str):
            rec["image"] = str((out / img).resolve())
        elif isinstance(img, list):
            rec["image"] = [str((out / p).resolve()) for p in img]
    ds = datasets.Dataset.from_list(rows)
    if rows and all(isinstance(r.get("image"), str) for r in rows):
        ds = ds.cast_column("image", datasets.Image())
    _check_hf_out(hf_out)
    with atomic_dir(hf_out, force=True, flag="--hf_out") as tmp:  # an interrupted save leaves the old one
        ds.save_to_disk(str(tmp))


def run_gen(cfg: GenConfig) -> dict:
    """Run (or resume) a gen job; returns the summary printed at the end."""
    from stagereason.console import report

    out = Path(cfg.out)
    if cfg.hf_out:
        _check_hf_out(cfg.hf_out)  # before any work, not after it
    _prepare_out(out, _job(cfg))
    done, repaired = _done_ids(out, cfg.retry_teacher_errors)
    if repaired:
        logger.warning("repaired a partial last line (%d bytes) left by an interrupted run", repaired)
    examples, total = _source(cfg, done)
    todo_total = None if total is None else max(0, total - len(done))
    todo = (ex for ex in examples if ex.id not in done)
    first = next(todo, None)
    if first is None:
        totals = _totals(out)
        msg = (f"nothing to do: every example of this job is already in {out} "
               f"({totals['accepted']} accepted, {totals['rejected']} rejected)")
        print(msg, file=sys.stderr)
        return {"nothing_to_do": True, **totals}
    import itertools

    todo = itertools.chain([first], todo)
    teacher, templates = None, {}
    if cfg.source != "synthetic":
        from stagereason.data_gen.prompts import load_template
        from stagereason.data_gen.teacher import Teacher

        templates = {"teacher": load_template("teacher", cfg.prompt_template),
                     "judge": load_template("judge", cfg.judge_template)}
        teacher = Teacher(cfg.teacher_base_url, cfg.teacher_model, api_key_env=cfg.api_key_env,
                          timeout=cfg.timeout, max_retries=cfg.max_retries, backoff=cfg.backoff,
                          temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    writer, stats = _Writer(out, cfg.copy_images), Counter()
    start = time.perf_counter()
    progress = _progress(cfg, todo_total)
    with progress:
        task = progress.add_task("gen", total=todo_total, rate=0.0, accept=0.0)

        def on_done():
            n = writer.counts["accepted"] + writer.counts["rejected"]
            elapsed = time.perf_counter() - start
            progress.update(task, completed=n, rate=n / max(elapsed, 1e-9),
                            accept=writer.counts["accepted"] / max(n, 1))

        try:
            asyncio.run(_run_all(todo, cfg, teacher, templates, writer, stats, on_done))
        finally:
            writer.close()
    elapsed = time.perf_counter() - start
    processed = writer.counts["accepted"] + writer.counts["rejected"]
    usage = teacher.usage if teacher else None
    this_run = {
        "processed": processed, "accepted": writer.counts["accepted"], "rejected": writer.counts["rejected"],
        "reject_reasons": {k.split(":", 1)[1]: v for k, v in sorted(writer.counts.items())
                           if k.startswith("reason:")},
        "requests": usage.requests if usage else 0, "retries": usage.retries if usage else 0,
        "transport_faults": dict(usage.faults) if usage else {},
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "judge_calls": stats["judge_calls"], "judge_accepted": stats["judge_accepted"],
        "elapsed_s": round(elapsed, 3), "records_per_s": round(processed / max(elapsed, 1e-9), 2),
    }
    old = json.loads((out / "stats.json").read_text()) if (out / "stats.json").is_file() else {}
    runs = old.get("runs", []) + [this_run]
    totals = _totals(out)
    summed = {k: sum(r.get(k, 0) for r in runs) for k in ("requests", "retries", "prompt_tokens",
                                                         "completion_tokens", "elapsed_s")}
    stats_doc = {**totals, **summed, "runs": runs}
    atomic_write_text(out / "stats.json", json.dumps(stats_doc, indent=2) + "\n")
    if cfg.hf_out:
        _save_hf(out, cfg.hf_out)
    summary = {"out": str(out), **totals, "this_run_processed": processed,
               "records_per_s": this_run["records_per_s"], "requests": this_run["requests"],
               "retries": this_run["retries"], "tokens": this_run["prompt_tokens"] + this_run["completion_tokens"],
               "elapsed_s": this_run["elapsed_s"]}
    report(f"gen finished: {out}", summary, cfg.json)
    return summary
