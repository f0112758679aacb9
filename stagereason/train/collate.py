"""Collation: open images lazily, cap their size, and let TRL build the batch with assistant-only labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from stagereason.infer.generate import filler_row, images_first
from stagereason.train.data import open_image

__all__ = ["StageCollator"]


@dataclasses.dataclass
class StageCollator:
    """Wraps TRL's ``DataCollatorForVisionLanguageModeling``.

    Images are opened here (a 100k-image dataset never sits in memory) and
    their longest side is capped at ``max_image_side``. Nothing is truncated:
    over-long rows are dropped before training. Labels are -100 everywhere but
    on assistant text and its end-of-turn token, as the training template's
    ``{% generation %}`` markers say. The marked character spans are mapped to
    tokens with the fast tokenizer's offsets (transformers' own alignment walks
    every token in Python); where a processor expands image tokens, so that
    offsets and ids disagree, TRL's assistant mask is used instead. As a last
    guard, any label outside the output vocabulary (Mllama's ``<|image|>``) is masked.
    """

    processor: object
    chat_template: str
    max_image_side: int | None = None
    vocab_size: int | None = None
    assistant_only: bool = True
    source: object = None  # an ImageSource resolving image references (default: references are paths)
    tiles: tuple[int, int] | None = None  # (tile size, most tiles per image): see data.fit_tiles
    stop_ids: tuple[int, ...] = ()  # end-of-turn tokens besides the tokenizer's eos (the model's generation eos)
    # several processes: a batch without images gets a filler row with one (see filler_row); its labels are -100
    vision_every_batch: bool = False

    def __post_init__(self):
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        kwargs = {"processor": self.processor, "max_length": None, "chat_template": self.chat_template}
        self._plain = DataCollatorForVisionLanguageModeling(assistant_only_loss=False, **kwargs)
        self._masked = DataCollatorForVisionLanguageModeling(assistant_only_loss=self.assistant_only, **kwargs)
        self._fast = self.assistant_only  # off once offsets and ids disagree: this processor expands tokens
        eos = self.processor.tokenizer.eos_token_id
        self._stops = torch.tensor(sorted({*self.stop_ids, *([eos] if eos is not None else [])}), dtype=torch.long)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        resolve = self.source or (lambda ref: ref)
        filler = filler_row() if self.vision_every_batch and not any(ex["images"] for ex in examples) else None
        if filler is not None:
            examples = [filler, *examples]
        # rows with images first: transformers' Mllama image processor (the torchvision one, loaded wherever
        # torchvision is installed) takes the image shape from the first row and fails on one without an image;
        # the order of a training batch's rows changes nothing
        examples = images_first(examples, lambda ex: ex["images"])
        batch = [{"messages": ex["messages"], "images": ex["images"] if ex is filler else
                  [open_image(resolve(s), self.max_image_side, self.tiles) for s in ex["images"]]} for ex in examples]
        if self._fast:
            out = self._plain(batch)
            mask = self._assistant_mask(examples, out["input_ids"], out["attention_mask"])
            if mask is None:  # offsets and ids disagree: let transformers align them, from now on
                self._fast = False
                out = self._masked(batch)
            else:
                out["labels"][~mask] = -100
        else:
            out = self._masked(batch)
        if self.assistant_only and len(self._stops):
            _end_at_stop(out["labels"], out["input_ids"], self._stops)
        if self.vocab_size is not None:
            out["labels"][out["labels"] >= self.vocab_size] = -100
        if filler is not None:  # the batch's one row with an image: it leads
            out["labels"][0] = -100
        return out

    def _assistant_mask(self, examples, input_ids, attention_mask) -> torch.Tensor | None:
        from transformers.utils.chat_template_utils import render_jinja_template

        tok = self.processor.tokenizer
        texts, spans = render_jinja_template(
            conversations=[ex["messages"] for ex in examples], chat_template=self.chat_template,
            return_assistant_tokens_mask=True, **tok.special_tokens_map)
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        lengths = attention_mask.sum(1).tolist()
        for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
            n = len(ids)
            if n != lengths[i] or ids != input_ids[i, :n].tolist():
                return None
            starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=n)
            row = np.zeros(n, dtype=bool)
            for lo, hi in spans[i]:
                row |= (starts >= lo) & (starts < hi)
            mask[i, :n] = torch.from_numpy(row)
        return mask


def _end_at_stop(labels: torch.Tensor, input_ids: torch.Tensor, stops: torch.Tensor) -> None:
    """End each run of labelled tokens at its last end-of-turn token, in place.

    Some training templates (TRL's Gemma 3 and Qwen-VL ones) mark the separator written after the end-of-turn
    token too ("<end_of_turn>\\n"): the model never generates it (generation stops at the end-of-turn token), so
    it is not the assistant's text. A run with no end-of-turn token in it is left as it is.
    """
    labelled = labels != -100
    if not labelled.any():
        return
    # number the runs over the whole batch; each run's last end-of-turn position; cut what follows it in the run
    start = labelled & ~torch.nn.functional.pad(labelled[:, :-1], (1, 0), value=False)
    run = torch.cumsum(start.flatten(), 0).view_as(labels)
    pos = torch.arange(labels.numel(), device=labels.device).view_as(labels)
    stop = torch.isin(input_ids, stops.to(input_ids.device)) & labelled
    last = torch.full((int(run.max()) + 1,), -1, dtype=torch.long, device=labels.device)
    last.scatter_reduce_(0, run[stop], pos[stop], reduce="amax")
    labels[labelled & (last[run] >= 0) & (pos > last[run])] = -100
