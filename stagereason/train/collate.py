"""Collation: open images lazily, cap their size, and let TRL build the batch with assistant-only labels."""

from __future__ import annotations

import dataclasses

import torch

from stagereason.train.data import open_image

__all__ = ["StageCollator"]


@dataclasses.dataclass
class StageCollator:
    """Wraps TRL's ``DataCollatorForVisionLanguageModeling``.

    Images are opened here (a 100k-image dataset never sits in memory) and
    their longest side is capped at ``max_image_side``. Nothing is truncated:
    over-long rows are dropped before training. Labels are -100 everywhere but
    on assistant text and its end-of-turn token (the training template's
    generation markers); as a last guard, any label outside the output
    vocabulary (Mllama's ``<|image|>``) is masked too.
    """

    processor: object
    chat_template: str
    max_image_side: int | None = None
    vocab_size: int | None = None
    assistant_only: bool = True
    source: object = None  # an ImageSource resolving image references (default: references are paths)

    def __post_init__(self):
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        self._inner = DataCollatorForVisionLanguageModeling(
            processor=self.processor, max_length=None, assistant_only_loss=self.assistant_only,
            chat_template=self.chat_template)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        resolve = self.source or (lambda ref: ref)
        batch = [{"messages": ex["messages"], "images": [open_image(resolve(s), self.max_image_side)
                                                         for s in ex["images"]]} for ex in examples]
        out = self._inner(batch)
        if self.vocab_size is not None:
            out["labels"][out["labels"] >= self.vocab_size] = -100
        return out
