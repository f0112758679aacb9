"""Judges that pick the best of N candidates: ``self`` (pairwise, by the model), ``loglik``, or any callable.

A judge returns, for each pair ``(a, b)``, the probability that ``a`` is the
better candidate. The knockout in :mod:`stagereason.infer.search` batches all
pairs of a round into one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stagereason.infer.decode import cache_kwarg, output_cache
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
        from stagereason.infer.decode import cross_layers

        self.model, self.processor = model, processor
        tok = processor.tokenizer
        self.label_ids = [tok.encode(x, add_special_tokens=False)[0] for x in ("1", "2")]
        self._cross = cross_layers(model)
        self._head: tuple[list[int], object, object] | None = None  # last shared opening run: ids, cache, prefix

    def _prompt(self, question: str, so_far: str, stage: str, first: str, second: str, n_images: int,
                context: str = "") -> str:
        """The comparison prompt. Everything but the two candidates comes first, so all the prompts of a
        question share a long opening (run once, kept across rounds and stages) and each prompt's own
        part is little more than its two candidates. ``context``: the conversation's turns before the
        question (:func:`~stagereason.infer.generate.earlier_turns`), which a follow-up question needs."""
        from stagereason.infer.generate import user_message

        part = "the whole answer" if stage == "ANSWER" else f"the {stage} stage"
        earlier = f"Conversation before the question:\n{context}\n\n" if context else ""
        text = (f"{earlier}Question: {question}\n\nAnswer so far:\n{so_far or '(nothing yet)'}\n\n"
                f"{CRITERIA[stage]} Which of two candidates for {part} is better?\n\n"
                f"Candidate 1: {first}\nCandidate 2: {second}\n\nAnswer with 1 or 2.")
        return self.processor.apply_chat_template(user_message(text, n_images), add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, prefix, question: str, stage: str, pairs: list[tuple[str, str]],
                 context: str = "") -> list[float]:
        """P(first is better) for each pair, averaged over both orders. ``context``: the turns before the
        question, for a conversation (see :meth:`_prompt`).

        All prompts of the call share their opening (template, image, question,
        answer so far, criteria): it is run once, its cache copied to every
        prompt, and only each prompt's own tokens are run after it, in one
        batch. The opening's cache is kept: a later call (the next knockout
        round, the next stage) runs only what its opening adds.
        """
        from stagereason.infer.decode import fork_cache

        so_far = prefix.text  # decoded once, not once per prompt
        n_images = 1 if prefix.images else 0
        texts = [self._prompt(question, so_far, stage, a, b, n_images, context) for a, b in pairs]
        texts += [self._prompt(question, so_far, stage, b, a, n_images, context) for a, b in pairs]
        tok = self.processor.tokenizer
        seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
        shared = 0
        while shared < min(len(x) for x in seqs) - 1 and len({x[shared] for x in seqs}) == 1:
            shared += 1  # every prompt keeps at least its last token of its own
        if shared == 0:
            raise ValueError("the judge prompts share no opening token; the chat template must start them alike")
        device, rows = self.model.device, len(seqs)
        xmask = self._cross_mask(prefix, seqs[0])
        cache = fork_cache(self._opening(prefix, seqs[0][:shared], xmask), rows)
        tails = [x[shared:] for x in seqs]
        width = max(len(t) for t in tails)
        ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in tails], device=device)
        last = [len(t) - 1 for t in tails]  # right padding: no real token ever attends to a pad
        keep = sorted(set(last))
        kwargs = {}
        if xmask is not None:
            pattern = xmask[:, -1:]  # every judge token comes after the image
            kwargs["cross_attention_mask"] = pattern.expand(rows, shared + width, -1, -1)
        logits = self.model(input_ids=ids, attention_mask=torch.ones(rows, shared + width, dtype=torch.long,
                                                                     device=device),
                            use_cache=True, logits_to_keep=torch.tensor(keep, device=device),
                            **{cache_kwarg(self.model): cache}, **kwargs).logits
        logits = logits[torch.arange(rows, device=device), [keep.index(k) for k in last]].float()
        two = logits[:, self.label_ids].softmax(-1)[:, 0]  # P("1")
        n = len(pairs)
        return [((two[i] + (1 - two[n + i])) / 2).item() for i in range(n)]

    def _opening(self, prefix, head: list[int], xmask):
        """The cache of ``head`` run through the model, reusing the longest run opening it starts with."""
        from stagereason.infer.decode import crop_cache

        common, cache = 0, None
        if self._head is not None and self._head[2] is prefix:
            old, old_cache, _ = self._head
            while common < min(len(old), len(head)) and old[common] == head[common]:
                common += 1
            if common:
                cache = crop_cache(old_cache, common, self._cross)
        if common < len(head):
            new = torch.tensor([head[common:]], device=self.model.device)
            kwargs = {}
            if xmask is not None:
                kwargs["cross_attention_mask"] = xmask[:, :len(head)]
                if cache is None:  # first run: the image's keys/values come from the prefix's image states
                    kwargs["cross_attention_states"] = prefix.xstates
            cache = output_cache(self.model(input_ids=new, attention_mask=torch.ones(1, len(head), dtype=torch.long,
                                                                                      device=self.model.device),
                                            use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): cache},
                                            **kwargs))
        self._head = (list(head), cache, prefix)
        return cache

    def _cross_mask(self, prefix, ids: list[int]):
        """Mllama's cross-attention mask for a judge prompt: from its image token on, the prefix image's tiles."""
        if prefix.xstates is None or prefix.xmask is None:
            return None
        image_id = getattr(self.processor, "image_token_id", None)
        if image_id is None:
            image_id = self.processor.tokenizer.convert_tokens_to_ids("<|image|>")
        first = ids.index(image_id)
        pattern = prefix.xmask[:, -1:]  # (1, 1, images, tiles)
        seen = (torch.arange(len(ids), device=pattern.device) >= first).to(pattern.dtype)
        return seen[None, :, None, None] * pattern


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
