"""Search strategies over the four stages: greedy, sample, best_of_n, sentence, stage (the paper's).

Every strategy forces each stage's opening tag, so the format cannot drift,
and closes a candidate that hits ``max_stage_tokens`` (marked ``capped`` in the
log). The prompt and image are encoded once (:class:`Prefix`); candidates are
generated together in one batched call that stops each row at the closing tag.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from stagereason.infer.generate import Prefix, earlier_turns, last_question
from stagereason.infer.judges import SelfJudge, knockout
from stagereason.stages import STAGES, StagedTrace, TraceFormatError, close_tag, open_tag, parse_trace

__all__ = ["STRATEGIES", "run_search"]

STRATEGIES = ("greedy", "sample", "best_of_n", "sentence", "stage")
ONE_PATH = ("greedy", "sample")  # one candidate a stage: no beam, nothing to judge
_SENTENCE_ENDS = (". ", ".\n")


def _content(text: str, stage: str) -> tuple[str, bool]:
    """Stage content of a candidate (text after the forced opening tag); whether it reached its closing tag."""
    closer = close_tag(stage)
    if closer in text:
        return text.split(closer, 1)[0].strip(), True
    return text.strip(), False


class _Judge:
    """Adapts a judge choice (``self``, ``loglik`` or a callable) to the knockout."""

    def __init__(self, judge, model, processor, image, question: str | list[dict]):
        self.kind = judge if isinstance(judge, str) else "callable"
        self.fn = judge if callable(judge) else None
        self.self_judge = SelfJudge(model, processor) if judge == "self" else None
        # a callable gets the last question; the self judge also reads the turns before it
        self.image, self.question, self.context = image, last_question(question), earlier_turns(question)

    def pick(self, prefix: Prefix, stage: str, texts: list[str], logliks: list[float] | None):
        if len(texts) == 1:
            return 0, [], None
        if self.kind == "self":
            def compare(pairs):
                return self.self_judge(prefix, self.question, stage, pairs, self.context)

            return (*knockout(texts, compare), None)
        if self.kind == "loglik":
            return (*knockout(texts, None, logliks), logliks)
        scores = [float(s) for s in self.fn(self.image, self.question, prefix.text, texts)]
        if len(scores) != len(texts):
            raise ValueError(f"judge returned {len(scores)} scores for {len(texts)} candidates")
        return (*knockout(texts, None, scores), scores)


def _force(prefix: Prefix, text: str) -> None:
    prefix.extend(prefix.tok.encode(text, add_special_tokens=False))


def _opening(prefix: Prefix, stage: str) -> str:
    done = prefix.text
    sep = "" if not done or done.endswith("\n\n") else "\n\n" if not done.endswith("\n") else "\n"
    return sep + open_tag(stage)


def _stage_round(prefix: Prefix, stage: str, n: int, opts: dict, judge: _Judge, stop: str | list[str]) -> dict:
    """One round: n candidates up to ``stop``, judged; the winner is appended to the prefix."""
    t0 = time.perf_counter()
    rows, logliks = prefix.continuations(n, stop, opts["max_tokens"], do_sample=opts["do_sample"],
                                         temperature=opts["temperature"], top_p=opts["top_p"],
                                         scores=judge.kind == "loglik" and n > 1)
    texts = [prefix.tok.decode(r, skip_special_tokens=True) for r in rows]
    winner, comparisons, scores = judge.pick(prefix, stage, texts, logliks)
    prefix.take(winner)
    stops = [stop] if isinstance(stop, str) else stop
    return {"candidates": [{"text": t, "tokens": len(r), "reached_stop": any(s in t for s in stops)}
                           for t, r in zip(texts, rows, strict=True)],
            "comparisons": comparisons, "scores": scores, "winner": winner,
            "tokens": sum(len(r) for r in rows), "seconds": round(time.perf_counter() - t0, 4)}


def _by_stage(prefix: Prefix, n: int, opts: dict, judge: _Judge, sentences: bool) -> list[dict]:
    log = []
    for stage in STAGES:
        _force(prefix, _opening(prefix, stage))
        start = len(prefix.text)
        entry = {"stage": stage, "rounds": [], "capped": False}
        budget = opts["max_stage_tokens"]
        while True:
            stop = [*_SENTENCE_ENDS, close_tag(stage)] if sentences else close_tag(stage)
            rnd = _stage_round(prefix, stage, n, {**opts, "max_tokens": budget}, judge, stop)
            entry["rounds"].append(rnd)
            budget -= rnd["candidates"][rnd["winner"]]["tokens"]
            if close_tag(stage) in prefix.text[start:]:
                break
            if budget <= 0 or rnd["candidates"][rnd["winner"]]["tokens"] == 0:
                entry["capped"] = True  # closed for it: the format cannot drift
                _force(prefix, " " + close_tag(stage))
                break
            if not sentences:
                entry["capped"] = True
                _force(prefix, " " + close_tag(stage))
                break
        log.append(entry)
    return log


def _best_of_n(prefix: Prefix, n: int, opts: dict, judge: _Judge) -> list[dict]:
    _force(prefix, open_tag(STAGES[0]))
    rnd = _stage_round(prefix, "ANSWER", n, {**opts, "max_tokens": opts["max_stage_tokens"] * len(STAGES)},
                       judge, close_tag(STAGES[-1]))
    return [{"stage": "ANSWER", "rounds": [rnd], "capped": close_tag(STAGES[-1]) not in prefix.text}]


def _repair(text: str) -> StagedTrace:
    """A strictly valid trace from whatever a whole-answer candidate holds (missing stages say so)."""
    try:
        return parse_trace(text)
    except TraceFormatError as strict_err:
        try:
            t = parse_trace(text, strict=False)
        except TraceFormatError as err:  # nothing recoverable: the whole text is the conclusion
            t = StagedTrace("", "", "", text.strip(), problems=tuple(err.problems))
        fill = {s.lower(): t.stage(s) or "(not given)" for s in STAGES}
        return StagedTrace(**fill, problems=tuple(t.problems) or tuple(strict_err.problems))


def check_options(search: str, beam_size: int, judge, max_stage_tokens: int | None = None,
                  temperature: float | None = None) -> None:
    """Raise ValueError for an unknown search or judge, a beam size below 1 where it is used, a token cap
    below 1, or a temperature at or below 0 for a search that samples."""
    if search not in STRATEGIES:
        raise ValueError(f"unknown search {search!r}; choose one of {', '.join(STRATEGIES)}")
    if max_stage_tokens is not None and max_stage_tokens < 1:
        raise ValueError(f"--max_stage_tokens {max_stage_tokens}: must be at least 1")
    if temperature is not None and search != "greedy" and temperature <= 0:
        raise ValueError(f"--temperature {temperature}: search {search!r} samples its candidates and needs a "
                         "temperature above 0 (--search greedy for a deterministic answer)")
    if search not in ONE_PATH and beam_size < 1:
        raise ValueError(f"beam_size {beam_size}: must be at least 1 for search {search!r}")
    if not callable(judge) and judge not in ("self", "loglik"):
        raise ValueError(f"unknown judge {judge!r}; use self, loglik or a callable")


def run_search(model, processor, images: list, question: str | list[dict], *, search: str = "stage",
               beam_size: int = 4, judge: str | Callable = "self", max_stage_tokens: int = 256,
               temperature: float = 0.7, top_p: float = 0.95) -> tuple[StagedTrace, str, list[dict], float]:
    """Run one strategy; returns ``(trace, raw_text, search_log, encode_seconds)``. ``question`` may be a
    conversation (chat messages ending with the user turn to answer): the self judge reads it whole, a callable
    judge is given its last question."""
    check_options(search, beam_size, judge)
    t0 = time.perf_counter()
    prefix = Prefix(model, processor, images, question)
    encode_s = time.perf_counter() - t0
    n = 1 if search in ONE_PATH else beam_size
    opts = {"do_sample": search != "greedy", "temperature": temperature, "top_p": top_p,
            "max_stage_tokens": max_stage_tokens}
    judge_ = _Judge(judge, model, processor, images[0] if images else None, question)
    if search == "best_of_n":
        log = _best_of_n(prefix, n, opts, judge_)
        raw = prefix.text
        return _repair(raw), raw, log, encode_s
    log = _by_stage(prefix, n, opts, judge_, sentences=search == "sentence")
    raw = prefix.text
    return _repair(raw), raw, log, encode_s


class _Row:
    """One question's answer so far, as token ids: the batched path's stand-in for ``Prefix``."""

    def __init__(self, tok, inputs: dict):
        self.tok, self.inputs, self.new = tok, inputs, []

    @property
    def text(self) -> str:
        return self.tok.decode(self.new, skip_special_tokens=False)

    def extend(self, ids) -> None:
        self.new += list(ids)


def _left_padded(rows: list[_Row], pad_id: int) -> dict:
    """One batch of the rows' prompts plus answers so far, left-padded; the image inputs joined: Mllama's
    stacked (its cross-attention mask extended over the answers), another VLM's concatenated (pixel values,
    image grids and sizes), its per-token image types padded and extended like the ids (answers are text)."""
    import torch

    seqs = [torch.cat([r.inputs["input_ids"][0], torch.tensor(r.new, dtype=torch.long,
                                                              device=r.inputs["input_ids"].device)]) for r in rows]
    length = max(len(s) for s in seqs)
    pad = [length - len(s) for s in seqs]
    pairs = list(zip(seqs, pad, strict=True))
    batch = {"input_ids": torch.stack([torch.cat([s.new_full((p,), pad_id), s]) for s, p in pairs]),
             "attention_mask": torch.stack([torch.cat([s.new_zeros(p), s.new_ones(len(s))]) for s, p in pairs])}
    first = rows[0].inputs
    if "cross_attention_mask" not in first:  # not Mllama (or Mllama without an image: nothing more)
        for key, value in first.items():
            if key in ("input_ids", "attention_mask") or not torch.is_tensor(value):
                continue
            if value.shape == first["input_ids"].shape and not value.is_floating_point():  # per token
                batch[key] = torch.stack([torch.cat([v.new_zeros(p), v, v.new_zeros(len(s) - len(v))])
                                          for v, s, p in zip((r.inputs[key][0] for r in rows), seqs, pad,
                                                             strict=True)])
            else:
                batch[key] = _joined([r.inputs[key] for r in rows])
    elif "pixel_values" in first:
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            batch[key] = torch.cat([r.inputs[key] for r in rows])
        masks = []
        for r, s, p in zip(rows, seqs, pad, strict=True):
            m = r.inputs["cross_attention_mask"][0]  # (prompt, images, tiles): answer tokens see what the last saw
            m = torch.cat([m, m[-1:].expand(len(s) - m.shape[0], -1, -1)])
            masks.append(torch.cat([m.new_zeros((p, *m.shape[1:])), m]))
        batch["cross_attention_mask"] = torch.stack(masks)
    return batch


def _joined(tensors: list):
    """The rows' tensors of one image input concatenated along the first dimension, zero-padded at the end of
    the others where the rows differ (LLaVA-NeXT's patches per image depend on its shape; the model drops the
    padding by each image's size, as in the processor's own batches)."""
    import torch

    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(tensors)
    most = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], *most))
        out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
        padded.append(out)
    return torch.cat(padded)


def run_greedy_batch(model, processor, items: list[tuple[list, str]], *, max_stage_tokens: int = 256
                     ) -> list[tuple[StagedTrace, str, list[dict], float]]:
    """``search="greedy"`` for many questions at once: each stage is one batched ``generate`` over all of them.

    Same forced opening tags, token-level stop at the closing tag, cap and
    closing as ``run_search``; the rows' token ids are kept (never re-tokenized
    from text), so the answers are those of answering one question at a time.
    Items with and without images go in separate batches. The prompt and
    answer so far are encoded again at each stage (the single-question path
    keeps a cache instead); decoding, where the time goes, is batched.
    """
    import torch

    from stagereason.infer.generate import _eos_ids, encode_prompt

    tok = processor.tokenizer
    eos = set(_eos_ids(model))
    t0 = time.perf_counter()
    rows = [_Row(tok, dict(encode_prompt(model, processor, images, question))) for images, question in items]
    encode_s = (time.perf_counter() - t0) / max(len(items), 1)
    logs: list[list[dict]] = [[] for _ in rows]
    groups = [[i for i, (imgs, _) in enumerate(items) if bool(imgs) == has] for has in (True, False)]
    with torch.no_grad():
        for stage in STAGES:
            for group in (g for g in groups if g):
                batch_rows = [rows[i] for i in group]
                for r in batch_rows:
                    _force(r, _opening(r, stage))
                starts = [len(r.text) for r in batch_rows]
                batch = _left_padded(batch_rows, tok.pad_token_id)
                t1 = time.perf_counter()
                out = model.generate(**batch, max_new_tokens=max_stage_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, stop_strings=[close_tag(stage)], tokenizer=tok,
                                     pad_token_id=tok.pad_token_id)
                seconds = (time.perf_counter() - t1) / len(group)
                for i, r, start, toks in zip(group, batch_rows, starts,
                                             out[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
                    end = next((k for k, t in enumerate(toks) if t == tok.pad_token_id or t in eos), len(toks))
                    r.extend(toks[:end])
                    text = tok.decode(toks[:end], skip_special_tokens=True)
                    closed = close_tag(stage) in r.text[start:]
                    if not closed:
                        _force(r, " " + close_tag(stage))
                    logs[i].append({"stage": stage, "capped": not closed, "rounds": [{
                        "candidates": [{"text": text, "tokens": end, "reached_stop": close_tag(stage) in text}],
                        "comparisons": [], "scores": None, "winner": 0, "tokens": end,
                        "seconds": round(seconds, 4), "batched": len(group)}]})
    return [(_repair(r.text), r.text, log, encode_s) for r, log in zip(rows, logs, strict=True)]
