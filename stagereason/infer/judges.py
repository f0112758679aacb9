"""Judges that pick the best of N candidates: ``self`` (pairwise, by the model), ``loglik``, or any callable.

A judge returns, for each pair ``(a, b)``, the probability that ``a`` is the
better candidate. The knockout in :mod:`stagereason.infer.search` batches all
pairs of a round into one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stagereason.stages import STAGES

__all__ = ["CRITERIA", "SelfJudge", "knockout"]

CRITERIA = {
    "SUMMARY": "A better summary outlines a clear, correct approach to the question.",
    "CAPTION": "A better caption describes what in the image matters for the question thoroughly and accurately.",
    "REASONING": "Better reasoning is correct, step by step, and consistent with the image and the caption.",
    "CONCLUSION": "A better conclusion agrees with the reasoning, answers the question directly, and never refuses.",
    "ANSWER": "A better answer is correct, follows from what the image shows, and ends with a direct conclusion.",
}


class SelfJudge:
    """The model compares two candidates under stage-specific criteria.

    The decision is read from the next-token probabilities of the labels
    ``1`` and ``2`` in one forward pass (no free-form text), and averaged over
    both orders to remove position bias. The image is not re-encoded: the
    prefix's projected image states are reused for every judge prompt.
    """

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        tok = processor.tokenizer
        self.label_ids = [tok.encode(x, add_special_tokens=False)[0] for x in ("1", "2")]

    def _prompt(self, question: str, so_far: str, stage: str, first: str, second: str) -> str:
        from stagereason.infer.generate import user_message

        part = "the whole answer" if stage == "ANSWER" else f"the {stage} stage"
        text = (f"Question: {question}\n\nAnswer so far:\n{so_far or '(nothing yet)'}\n\n"
                f"Two candidates for {part}:\nCandidate 1: {first}\nCandidate 2: {second}\n\n"
                f"{CRITERIA[stage]} Which candidate is better? Answer with 1 or 2.")
        n_images = 1 if self._prefix_images else 0
        return self.processor.apply_chat_template(user_message(text, n_images), add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, prefix, question: str, stage: str, pairs: list[tuple[str, str]]) -> list[float]:
        """P(first is better) for each pair, averaged over both orders."""
        self._prefix_images = bool(prefix.images)
        texts = [self._prompt(question, prefix.text, stage, a, b) for a, b in pairs]
        texts += [self._prompt(question, prefix.text, stage, b, a) for a, b in pairs]
        images = [prefix.images] * len(texts) if prefix.images else None
        inputs = self.processor(images=images, text=texts, padding=True, padding_side="left",
                                add_special_tokens=False, return_tensors="pt").to(self.model.device)
        kwargs = {}
        if prefix.xstates is not None:
            kwargs["cross_attention_states"] = prefix.xstates.repeat(len(texts), 1, 1)
            kwargs["cross_attention_mask"] = inputs["cross_attention_mask"]
        logits = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            logits_to_keep=1, **kwargs).logits[:, -1].float()
        two = logits[:, self.label_ids].softmax(-1)[:, 0]  # P("1")
        n = len(pairs)
        return [((two[i] + (1 - two[n + i])) / 2).item() for i in range(n)]


def knockout(candidates: list[str], compare: Callable[[list[tuple[str, str]]], list[float]] | None,
             scores: list[float] | None = None) -> tuple[int, list[dict]]:
    """Pick a winner by knockout; every round's pairs go to ``compare`` in one call.

    Args:
        candidates: candidate texts.
        compare: pairwise judge, ``pairs -> P(first better)``; or None to use ``scores``.
        scores: per-candidate scores (higher is better) for score-based judges.

    Returns:
        ``(winner_index, comparisons)``; each comparison is ``{"a", "b", "p_a", "winner"}``.
    """
    alive = list(range(len(candidates)))
    log: list[dict] = []
    while len(alive) > 1:
        pairs = [(alive[i], alive[i + 1]) for i in range(0, len(alive) - 1, 2)]
        if compare is not None:
            probs = compare([(candidates[a], candidates[b]) for a, b in pairs])
        else:
            probs = [1.0 if scores[a] > scores[b] else 0.0 if scores[a] < scores[b] else 0.5 for a, b in pairs]
        nxt = []
        for (a, b), p in zip(pairs, probs, strict=True):
            w = a if p >= 0.5 else b
            log.append({"a": a, "b": b, "p_a": round(float(p), 4), "winner": w})
            nxt.append(w)
        if len(alive) % 2:
            nxt.append(alive[-1])  # a bye
        alive = nxt
    return alive[0], log


assert set(CRITERIA) >= set(STAGES)
