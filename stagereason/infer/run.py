"""``stagereason infer``: one image and question -> four readable stages, a search summary, JSON or an HTML tree."""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Literal

from stagereason.console import print_json
from stagereason.stages import STAGES

__all__ = ["InferConfig", "run_infer", "write_html"]


def _f(default, help):  # noqa: A002 - argparse's word
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class SearchOptions:
    """Search options shared by ``infer`` and ``eval``."""

    model: str | None = _f(None, "A base model, merged export, full fine-tune dir, or the base of --adapter "
                                 "(default: with --adapter, the base its run records; else runs/tiny-cpu).")
    adapter: str | None = _f(None, "A LoRA/QLoRA train run dir to load on top of --model.")
    quantization: str | None = _f(None, "4bit or 8bit to load the base quantized.")
    search: Literal["greedy", "sample", "best_of_n", "sentence", "stage"] = _f(
        "stage", "stage: N candidates per stage, judged (the paper's); best_of_n: whole answers; sentence: "
                 "sentence-level beam; greedy; sample.")
    beam_size: int = _f(4, "Candidates per stage (or per answer / sentence).")
    judge: Literal["self", "loglik"] = _f("self", "self: the model compares candidates pairwise; loglik: mean "
                                                  "token log-probability.")
    seed: int = _f(0, "Seed for sampling (same seed, same answer).")
    max_stage_tokens: int = _f(256, "Token cap per stage; a candidate that hits it is closed and marked capped.")
    temperature: float = _f(0.7, "Sampling temperature of the candidates.")

    def __post_init__(self):
        if self.adapter and not Path(self.adapter).is_dir():
            raise FileNotFoundError(f"--adapter {self.adapter} does not exist (give a train run dir)")
        if self.model is None and self.adapter:
            from stagereason.modeling import recorded_base

            self.model = recorded_base(self.adapter)
            if not self.model:
                raise ValueError(f"--adapter {self.adapter} does not record its base model (no run_info.json / "
                                 "adapter_config.json naming it); pass the base as --model")
        elif self.model is None:
            self.model = "runs/tiny-cpu"


@dataclasses.dataclass
class InferConfig(SearchOptions):
    """Options of ``stagereason infer``."""

    image: str | None = _f(None, "The image file (omit for a text-only question).")
    question: str = _f("", "The question.")
    json: bool = _f(False, "Print one JSON object: summary, caption, reasoning, conclusion, answer, search, usage.")
    html: str | None = _f(None, "Write a self-contained page with every stage's candidates and comparisons here.")


def _summary_line(res) -> str:
    parts = []
    for entry in res.search_log:
        n = sum(len(r["candidates"]) for r in entry["rounds"])
        comps = sum(len(r["comparisons"]) for r in entry["rounds"])
        parts.append(f"{entry['stage'].lower()}: {n} cand, {comps} cmp{', capped' if entry['capped'] else ''}")
    u = res.usage
    how = f" (beam {u['beam_size']}, judge {u['judge']})" if u.get("judge") else ""
    return (f"search {u['search']}{how}: " + "; ".join(parts)
            + f" | {u['total_tokens']} tokens, {u['seconds']:.2f} s")


def write_html(res, question: str, path: str | Path, image_path: str | None = None) -> None:
    """A self-contained page: per stage, every candidate, the pairwise comparisons and the winner."""
    import base64

    esc = html.escape
    img = ""
    if image_path and Path(image_path).is_file():
        data = base64.b64encode(Path(image_path).read_bytes()).decode()
        img = f'<img src="data:image;base64,{data}" style="max-width:320px">'
    blocks = []
    for entry in res.search_log:
        rounds = []
        for k, rnd in enumerate(entry["rounds"]):
            items = []
            for i, c in enumerate(rnd["candidates"]):
                score = "" if rnd["scores"] is None else f", score {rnd['scores'][i]:.4f}"
                win = "win" if i == rnd["winner"] else ""
                capped = "" if c["reached_stop"] else ", capped"
                items.append(f'<li class="{win}"><pre>{esc(c["text"])}</pre>'
                             f'<small>{c["tokens"]} tokens{capped}{score}</small></li>')
            cands = "".join(items)
            comps = "".join(f'<li>#{c["a"]} vs #{c["b"]}: P(#{c["a"]} better) = {c["p_a"]:.3f} &rarr; '
                            f'#{c["winner"]}</li>' for c in rnd["comparisons"])
            rounds.append(f"<h4>round {k + 1}: winner #{rnd['winner']}</h4><ol start=0>{cands}</ol>"
                          + (f"<ul>{comps}</ul>" if comps else ""))
        blocks.append(f"<section><h3>{esc(entry['stage'])}{' (capped)' if entry['capped'] else ''}</h3>"
                      + "".join(rounds) + "</section>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>stagereason search</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}pre{{white-space:pre-wrap;margin:0}}
li{{margin:.4em 0;padding:.3em;border:1px solid #ddd}}li.win{{border:2px solid #2a2;background:#efe}}
section{{border-top:2px solid #444;margin-top:1.5em}}</style></head><body>
<h2>{esc(question)}</h2>{img}<p><b>answer:</b> {esc(res.answer)}</p><p>{esc(_summary_line(res))}</p>
{''.join(blocks)}<h3>final text</h3><pre>{esc(res.text)}</pre></body></html>"""
    from stagereason.data_gen.records import atomic_write_text

    atomic_write_text(Path(path), page)


def run_infer(cfg: InferConfig) -> dict:
    """Answer one question; print the stages (or JSON); optionally write the HTML search tree."""
    from stagereason.infer.reasoner import Reasoner, check_search_before_loading, load_image
    from stagereason.infer.search import check_options

    if not cfg.question.strip():
        raise ValueError("--question is empty")
    # bad options, a missing or unreadable image, or nowhere to write the page fail before the model loads
    check_options(cfg.search, cfg.beam_size, cfg.judge, cfg.max_stage_tokens, cfg.temperature)
    check_search_before_loading(cfg.model, cfg.adapter, cfg.search)
    image = None if cfg.image is None else load_image(cfg.image)
    if cfg.html and Path(cfg.html).is_dir():
        raise ValueError(f"--html {cfg.html} is a folder; name the page's file, e.g. {Path(cfg.html) / 'search.html'}")
    if cfg.html and not Path(cfg.html).resolve().parent.is_dir():
        raise FileNotFoundError(f"--html {cfg.html}: folder {Path(cfg.html).resolve().parent} does not exist")
    reasoner = Reasoner.from_pretrained(cfg.model, adapter=cfg.adapter, quantization=cfg.quantization,
                                        max_stage_tokens=cfg.max_stage_tokens, temperature=cfg.temperature,
                                        questions=(cfg.question,))
    res = reasoner.answer(image, cfg.question, search=cfg.search, beam_size=cfg.beam_size, judge=cfg.judge,
                          seed=cfg.seed)
    out = {**res.trace.as_dict(), "answer": res.answer, "search": res.search_log, "usage": res.usage}
    if cfg.html:
        write_html(res, cfg.question, cfg.html, cfg.image)
    if cfg.json:
        print_json(out, ensure_ascii=False)
    else:
        for stage in STAGES:
            print(f"{stage}\n  {res.trace.stage(stage)}\n")
        print(f"answer: {res.answer}\n{_summary_line(res)}")
        if cfg.html:
            print(f"search tree: {cfg.html}")
    return out
