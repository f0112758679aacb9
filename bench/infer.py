"""Stage-level beam search: ours against a naive implementation of the same algorithm and plain greedy.

Same tiny model, image, question, beam size and per-stage token cap. The naive
implementation (below, written the way the public reference works) generates
candidates one at a time, re-encodes the image and the whole prefix for every
candidate, checks for the closing tag by decoding the whole text at every
step, and judges by free-form generation. Plain greedy is one `generate` of
the whole answer. The model has random weights, so no candidate closes its
stage early: every variant generates the same number of tokens per stage.

    python bench/infer.py            # a table
    python bench/infer.py --json     # one JSON line
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from stagereason.console import report
from stagereason.infer.judges import CRITERIA
from stagereason.stages import STAGES, close_tag, open_tag


class _DecodeWholeText(StoppingCriteria):
    """The naive stop check: decode everything generated so far at every step and look for the tag."""

    def __init__(self, tok, start: int, tag: str):
        self.tok, self.start, self.tag = tok, start, tag

    def __call__(self, input_ids, scores, **kwargs):
        return self.tag in self.tok.decode(input_ids[0, self.start:])


def _inputs(processor, image, text):
    return processor(images=[[image]], text=[text], add_special_tokens=False, return_tensors="pt")


def naive_stage_search(model, processor, image, question, n, max_stage_tokens, judge_tokens=64):
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    answer = ""
    for stage in STAGES:
        answer += ("\n\n" if answer else "") + open_tag(stage)
        candidates = []
        for _ in range(n):  # one at a time, image and prefix encoded again each time
            inputs = _inputs(processor, image, prompt + answer)
            start = inputs["input_ids"].shape[1]
            stop = StoppingCriteriaList([_DecodeWholeText(tok, start, close_tag(stage))])
            out = model.generate(**inputs, max_new_tokens=max_stage_tokens, do_sample=True, temperature=0.7,
                                 top_p=0.95, pad_token_id=tok.pad_token_id, stopping_criteria=stop)
            candidates.append(tok.decode(out[0, start:], skip_special_tokens=True))
        best = candidates[0]
        for other in candidates[1:]:  # knockout, judged by free-form generation
            text = (f"Question: {question}\nAnswer so far:\n{answer}\nCandidate 1: {best}\nCandidate 2: {other}\n"
                    f"{CRITERIA[stage]} Which candidate is better? Explain, then answer 1 or 2.")
            judge_prompt = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                add_generation_prompt=True)
            inputs = _inputs(processor, image, judge_prompt)
            out = model.generate(**inputs, max_new_tokens=judge_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            verdict = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            if re.search(r"\b2\b", verdict):
                best = other
        answer += best if close_tag(stage) in best else best + " " + close_tag(stage)
    return answer


def plain_greedy(model, processor, image, question, max_new_tokens):
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    inputs = _inputs(processor, image, prompt)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:])


def best_of_interleaved(runs: dict, repeats: int) -> dict:
    """Best wall time of each variant over ``repeats`` rounds, the variants interleaved within a round (a slow spell
    of the machine hits every variant alike); round r seeds torch with r. GPU work is waited for."""
    best = dict.fromkeys(runs, float("inf"))
    with torch.no_grad():
        for r in range(repeats):
            for name, fn in runs.items():
                torch.manual_seed(r)
                t0 = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default=None, help="a model dir (default: a `demo` tiny model built here)")
    p.add_argument("--max_stage_tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.repeats < 1 or args.max_stage_tokens < 1:
        p.error("--repeats and --max_stage_tokens must be at least 1")

    from transformers.utils import logging as hf_logging

    from stagereason.infer.reasoner import Reasoner
    from stagereason.tiny import build_tiny_model

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(Path(tmp) / "model")
        if args.model is None:
            build_tiny_model(model_dir, preset="demo", seed=0)
        reasoner = Reasoner.from_pretrained(model_dir, max_stage_tokens=args.max_stage_tokens)
    model, processor = reasoner.model, reasoner.processor
    image = Image.new("RGB", (128, 128), "white")
    question = "How many red objects are there in the image?"
    cap = args.max_stage_tokens
    runs = {"greedy": lambda: plain_greedy(model, processor, image, question, cap * len(STAGES))}
    for n in (2, 4):
        runs[f"ours_n{n}"] = lambda n=n: reasoner.answer(image, question, search="stage", beam_size=n, judge="self",
                                                         seed=None)
        runs[f"naive_n{n}"] = lambda n=n: naive_stage_search(model, processor, image, question, n, cap)
    best = best_of_interleaved(runs, args.repeats)
    greedy, result = best["greedy"], {}
    for n in (2, 4):
        ours, naive = best[f"ours_n{n}"], best[f"naive_n{n}"]
        result[f"ours_n{n}_s"] = round(ours, 3)
        result[f"naive_n{n}_s"] = round(naive, 3)
        result[f"speedup_vs_naive_n{n}"] = round(naive / ours, 2)
        result[f"overhead_vs_greedy_n{n}"] = round(ours / greedy, 2)
    result["greedy_s"] = round(greedy, 3)
    result["max_stage_tokens"] = cap
    result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    report("bench/infer.py: stage beam search wall time", result, args.json)


if __name__ == "__main__":
    main()
