"""``stagereason eval``: accuracy, format rate, tokens and latency over a dataset, per question family."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

from stagereason.infer.run import SearchOptions, _f

logger = logging.getLogger(__name__)

__all__ = ["EvalConfig", "run_eval"]


@dataclasses.dataclass
class EvalConfig(SearchOptions):
    """Options of ``stagereason eval``."""

    data: str = _f("runs/synthetic", "A gen output dir, data.jsonl or HF dataset (answers: each row's `answer`, "
                                     "else the conclusion of its trace; a row may end with its question when it "
                                     "gives the `answer`).")
    image_root: str | None = _f(None, "Folder the rows' image paths are relative to (default: the file's folder).")
    limit: int | None = _f(None, "Evaluate only the first N rows.")
    batch_size: int = _f(8, "Questions answered together with --search greedy (one batched generate per stage).")
    out: str = _f("runs/eval", "Where predictions.jsonl and report.json go.")
    force: bool = _f(False, "Replace an existing predictions.jsonl / report.json in --out.")
    skip_invalid: bool = _f(False, "Drop and count invalid rows (bad JSON, roles, traces) instead of stopping.")
    progress: bool = _f(True, "Show a progress bar.")
    json: bool = _f(False, "Print the report as one JSON object.")


def _check(cfg: EvalConfig) -> Path:
    """Refuse bad options and an existing report before any model loads; returns the output folder."""
    from stagereason.infer.reasoner import check_search_before_loading
    from stagereason.infer.search import check_options

    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit {cfg.limit}: must be at least 1 (leave it out to evaluate every row)")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch_size {cfg.batch_size}: must be at least 1")
    check_options(cfg.search, cfg.beam_size, cfg.judge, cfg.max_stage_tokens, cfg.temperature)
    check_search_before_loading(cfg.model, cfg.adapter, cfg.search)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder for predictions.jsonl and report.json")
    for name in ("report.json", "predictions.jsonl"):
        if (out / name).exists() and not cfg.force:
            raise FileExistsError(f"{out / name} exists; pass --force to replace it or choose another --out")
    return out


def _prompt(row) -> str | list[dict]:
    """What a row asks: its question, or, after earlier turns or a system turn, its conversation up to the last
    question (the earlier answers as the row gives them), as the model was trained on such rows."""
    last = max((k for k, m in enumerate(row.messages) if m["role"] == "user"), default=None)
    if last is None or last == 0:
        return row.question
    return row.messages[:last + 1]


def _answer_rows(cfg: EvalConfig, reasoner, rows: list, source) -> tuple[list[dict], list[dict]]:
    """Answer every row (greedy in batches, other searches one at a time) and score it; returns
    ``(predictions, skipped rows)``. A missing or corrupt image is its row's failure, not the run's."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stagereason.infer.reasoner import load_image
    from stagereason.stages import answers_match

    preds, errors = [], []
    progress = Progress(TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("acc {task.fields[acc]:.1%}"), console=Console(stderr=True),
                        disable=not cfg.progress)
    step = cfg.batch_size if cfg.search == "greedy" else 1
    with progress:
        task = progress.add_task("eval", total=len(rows), acc=0.0)
        for start in range(0, len(rows), step):
            chunk, items = [], []
            for row in rows[start:start + step]:
                try:
                    if len(row.images) > 1:
                        raise ValueError(f"it has {len(row.images)} images; a question is answered about one")
                    question = reasoner.check_question(_prompt(row), len(row.images))
                    items.append((load_image(source(row.images[0])) if row.images else None, question))
                    chunk.append(row)
                except (FileNotFoundError, ValueError) as err:
                    errors.append({"id": row.id, "error": str(err)})
                    logger.warning("row %s: %s", row.id, err)
            progress.update(task, advance=len(rows[start:start + step]) - len(chunk))
            if not chunk:
                continue
            t0 = time.perf_counter()
            if step > 1:
                results = reasoner.answer_batch(items, search="greedy", batch_size=step)
            else:
                results = [reasoner.answer(*items[0], search=cfg.search, beam_size=cfg.beam_size,
                                           judge=cfg.judge, seed=cfg.seed + start)]
            latency = (time.perf_counter() - t0) / len(chunk)  # a batch's wall time, shared by its questions
            for row, res in zip(chunk, results, strict=True):
                # a stage that hit --max_stage_tokens was closed by the search, not by the model: not in format
                capped = [e["stage"] for e in res.search_log if e.get("capped")]
                preds.append({"id": row.id, "question": row.question, "answer": row.answer,
                              "prediction": res.answer,
                              "correct": bool(row.answer) and answers_match(res.trace.conclusion, row.answer),
                              "format_ok": res.trace.ok and not capped, "capped_stages": capped,
                              "tokens": res.usage["total_tokens"], "latency_s": round(latency, 4),
                              "family": row.family, "text": res.text})
            progress.update(task, advance=len(chunk), acc=sum(p["correct"] for p in preds) / len(preds))
    return preds, errors


def run_eval(cfg: EvalConfig) -> dict:
    """Answer every row with the chosen search; score with ``answers_match``; write predictions and a report."""
    from stagereason.console import report
    from stagereason.data_gen.records import atomic_write_text
    from stagereason.infer.reasoner import Reasoner
    from stagereason.infer.search import ONE_PATH
    from stagereason.train.data import load_rows

    out = _check(cfg)
    rows, rep, source = load_rows(cfg.data, cfg.image_root, check_images=False, skip_invalid=cfg.skip_invalid,
                                  questions=True, tag="hfeval")  # of a DatasetDict: its test / validation split
    rows = rows[: cfg.limit] if cfg.limit is not None else rows
    if not rows:
        raise ValueError(f"no rows to evaluate in {cfg.data} ({rep.rows} read, {len(rep.problems)} invalid)")
    reasoner = Reasoner.from_pretrained(cfg.model, adapter=cfg.adapter, quantization=cfg.quantization,
                                        max_stage_tokens=cfg.max_stage_tokens, temperature=cfg.temperature)
    preds, errors = _answer_rows(cfg, reasoner, rows, source)
    errors = [{"id": row, "error": msgs[0]} for row, msgs in rep.problems.items()] + errors  # --skip_invalid
    n = len(preds)
    if not n:
        raise ValueError(f"no row of {cfg.data} could be answered; first problem: {errors[0]['error']}")
    fam = defaultdict(lambda: {"n": 0, "correct": 0})
    for p in preds:
        fam[p["family"] or "all"]["n"] += 1
        fam[p["family"] or "all"]["correct"] += p["correct"]
    one_path = cfg.search in ONE_PATH
    result = {
        "n": n, "skipped": len(errors), "skipped_rows": errors[:20], "accuracy": sum(p["correct"] for p in preds) / n,
        "format_rate": sum(p["format_ok"] for p in preds) / n,
        "capped_rate": sum(bool(p["capped_stages"]) for p in preds) / n,
        "mean_tokens": sum(p["tokens"] for p in preds) / n, "mean_latency_s": sum(p["latency_s"] for p in preds) / n,
        "search": cfg.search, "beam_size": 1 if one_path else cfg.beam_size, "judge": None if one_path else cfg.judge,
        "batch_size": cfg.batch_size if cfg.search == "greedy" else 1, "model": cfg.model,
        "adapter": cfg.adapter, "data": cfg.data,
        "families": {k: {**v, "accuracy": v["correct"] / v["n"]} for k, v in sorted(fam.items())},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    atomic_write_text(out / "report.json", json.dumps(result, indent=2) + "\n")
    shown = {k: v for k, v in result.items() if k not in ("families", "skipped_rows")}
    if not cfg.json:
        for k, v in result["families"].items():
            shown[f"family {k}"] = f"{v['accuracy']:.1%} of {v['n']}"
    report(f"eval: {cfg.data}", shown if not cfg.json else result, cfg.json)
    return result
