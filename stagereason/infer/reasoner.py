"""The ``Reasoner`` API: answer a question about an image in four stages, with a chosen search."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stagereason.modeling import special_token_in_messages, structural_special_tokens, written_special_token
from stagereason.stages import StagedTrace

__all__ = ["Reasoner", "ReasoningResult", "load_image"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ReasoningResult:
    """One answer: the trace, its text, the final answer, how the search went and what it cost."""

    trace: StagedTrace
    text: str
    search_log: list[dict]
    usage: dict

    @property
    def answer(self) -> str:
        return self.trace.answer

    def to_dict(self) -> dict:
        return {**self.trace.as_dict(), "answer": self.answer, "text": self.text, "search": self.search_log,
                "usage": self.usage}


def load_image(image: Any):
    """A path, raw bytes or a PIL image -> an RGB PIL image (:func:`stagereason.train.data.open_image`).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: data that does not decode as an image.
    """
    from stagereason.train.data import open_image

    return open_image(image)


class Reasoner:
    """Staged answers from a base model, a merged export, a full fine-tune, or base + adapter.

    Example:
        >>> r = Reasoner.from_pretrained("runs/tiny-cpu")
        >>> res = r.answer("scene.png", "How many red objects are there?", search="stage", beam_size=4)
        >>> res.trace.conclusion, res.answer, res.usage["total_tokens"]
    """

    def __init__(self, model, processor, *, max_stage_tokens: int = 256, temperature: float = 0.7,
                 top_p: float = 0.95):
        from stagereason.infer.decode import drop_unapplied_processing, mllama_parts

        # other VLMs answer greedily (batched generate, stage by stage); the searches reuse Mllama's image states
        self.kind = None if mllama_parts(model)[0] is not None else getattr(
            getattr(model, "config", None), "model_type", type(model).__name__)
        _needs_chat_template(processor)
        self.model, self.processor = model.eval(), processor
        self._specials = structural_special_tokens(processor)  # those a question must not write out
        dropped = drop_unapplied_processing(model)
        if dropped:
            logger.warning("the model's generation_config sets %s; staged decoding applies only temperature, top-k "
                           "and top-p, so these are ignored (greedy batches too, for the same answers)",
                           ", ".join(f"{k}={v!r}" for k, v in dropped.items()))
        self.max_stage_tokens, self.temperature, self.top_p = max_stage_tokens, temperature, top_p

    @classmethod
    def from_pretrained(cls, path: str | Path, adapter: str | Path | None = None, quantization: str | None = None,
                        dtype: str = "auto", attn_implementation: str = "auto", questions: tuple = (),
                        **kwargs) -> Reasoner:
        """Load ``path`` (and ``adapter``, a train run dir) with :func:`stagereason.modeling.load_model`.

        ``path`` may be a base model, a merged export, a full fine-tune run dir,
        or a LoRA/QLoRA run dir alone (its recorded base is loaded under it).
        ``questions`` are checked (:meth:`check_question`) against the processor before any weight loads.
        """
        from stagereason.modeling import load_model

        def check(processor) -> None:
            _needs_chat_template(processor)
            specials = structural_special_tokens(processor)
            for question in questions:
                _checked(question, processor, specials)

        path, adapter = _base_and_adapter(path, adapter)
        model, processor = load_model(path, quantization=quantization, adapter=adapter, dtype=dtype,
                                      attn_implementation=attn_implementation, check_processor=check)
        return cls(model, processor, **kwargs)

    def answer(self, image: Any, question: str, *, search: str = "stage", beam_size: int = 4,
               judge: str | Callable = "self", seed: int | None = 0, max_stage_tokens: int | None = None,
               temperature: float | None = None) -> ReasoningResult:
        """Answer one question about one image (``image=None`` for text only).

        Args:
            image: a path, raw bytes, a PIL image, or None.
            question: the question (not empty), or the conversation so far: chat messages ending with the user
                turn to answer, the image's place marked by a ``{"type": "image"}`` part (the layout of
                training rows; see :meth:`check_question`). The self judge reads the turns before the
                last question; a callable judge is given the last question.
            search: greedy, sample, best_of_n, sentence or stage.
            beam_size: candidates per stage (or per answer / sentence).
            judge: ``self``, ``loglik`` or ``fn(image, question, prefix, candidates) -> scores``.
            seed: makes sampling reproducible (None: not seeded).

        Raises:
            ValueError: empty question or one that writes out a special token of the prompt, unreadable image,
                unknown search or judge.
            FileNotFoundError: a missing image file.
        """
        from stagereason.infer.search import ONE_PATH, run_search

        self._check_search(search)
        if self.kind is not None:  # greedy on another VLM: the batched path, one question
            return self.answer_batch([(image, question)], batch_size=1, search=search, beam_size=beam_size,
                                     judge=judge, seed=seed, max_stage_tokens=max_stage_tokens,
                                     temperature=temperature)[0]
        images, question = self._prepared(image, question)
        if seed is not None:
            random.seed(seed)
            torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            trace, raw, log, encode_s = run_search(
                self.model, self.processor, images, question, search=search, beam_size=beam_size,
                judge=judge, max_stage_tokens=max_stage_tokens or self.max_stage_tokens,
                temperature=self.temperature if temperature is None else temperature, top_p=self.top_p)
        one_path = search in ONE_PATH
        usage = _usage(log, encode_s, time.perf_counter() - t0, search=search, beam_size=1 if one_path else beam_size,
                       judge=None if one_path else judge if isinstance(judge, str)
                       else getattr(judge, "__name__", "callable"))
        return ReasoningResult(trace=trace, text=raw, search_log=log, usage=usage)

    def answer_batch(self, items: list[tuple[Any, str]], *, batch_size: int = 8, **kwargs) -> list[ReasoningResult]:
        """``answer`` for each ``(image, question)``; same options for all.

        ``search="greedy"`` runs ``batch_size`` questions at a time, each stage
        one batched ``generate`` (same answers as one at a time); the other
        strategies batch within a question (candidates, judge comparisons) and
        take the questions in turn.
        """
        self._check_search(kwargs.get("search", "stage"))
        if self.kind is None and (kwargs.get("search", "stage") != "greedy" or len(items) < 2 or batch_size < 2):
            return [self.answer(image, question, **kwargs) for image, question in items]
        batch_size = max(batch_size, 1)
        from stagereason.infer.search import check_options, run_greedy_batch

        options = inspect.signature(self.answer).bind(None, "", **kwargs)  # TypeError on an unknown option
        options.apply_defaults()
        check_options("greedy", options.arguments["beam_size"], options.arguments["judge"])
        prepared = []
        for k, (image, question) in enumerate(items):
            try:
                prepared.append(self._prepared(image, question))
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"item {k}: {err}") from err
        results = []
        for start in range(0, len(prepared), batch_size):
            t0 = time.perf_counter()
            with torch.no_grad():
                outs = run_greedy_batch(self.model, self.processor, prepared[start:start + batch_size],
                                        max_stage_tokens=kwargs.get("max_stage_tokens") or self.max_stage_tokens)
            seconds = (time.perf_counter() - t0) / len(outs)
            for trace, raw, log, encode_s in outs:
                usage = _usage(log, encode_s, seconds, search="greedy", beam_size=1, judge=None, batched=len(outs))
                results.append(ReasoningResult(trace=trace, text=raw, search_log=log, usage=usage))
        return results

    def check_question(self, question: str | list[dict], n_images: int | None = None) -> str | list[dict]:
        """The question as it will be asked (a string stripped; a conversation with its contents as parts).

        ``question`` is a string, or the conversation so far: chat messages (``role`` system, user or
        assistant; ``content`` a string or ``{"type": "text" | "image"}`` parts, as in training rows) ending
        with the user turn to answer. ``n_images``, when given, is the number of images that go with it: a
        conversation must mark that many places for them.

        Raises:
            ValueError: an empty question; a text that writes out one of the special tokens that structure
                the model's prompt (``<|image|>``, ``<|eot_id|>``...), which the tokenizer would read as those
                tokens; a conversation that is malformed, does not end with a user turn, marks another number
                of images, or that the model's chat template refuses.
        """
        return _checked(question, self.processor, self._specials, n_images)

    def _prepared(self, image: Any, question: str | list[dict]) -> tuple[list, str | list[dict]]:
        """The checked question and the opened image list (empty for text only)."""
        question = self.check_question(question, 0 if image is None else 1)
        return ([] if image is None else [load_image(image)]), question

    def _check_search(self, search: str) -> None:
        if self.kind is not None:  # whatever its type says: the searches need Mllama's parts, found here or not
            _refuse_search(self.kind, search)


def _refuse_search(kind: str, search: str) -> None:
    """Only greedy decoding runs on a model whose Mllama parts (``decode.mllama_parts``) are not there."""
    if search != "greedy":
        raise ValueError(f"search {search!r} runs on Llama-3.2-Vision (Mllama) models, and this is a {kind!r} model: "
                         "the searches reuse Mllama's cross-attention image states; use search 'greedy' "
                         "(--search greedy)")


def _base_and_adapter(path: str | Path, adapter: str | Path | None) -> tuple[str | Path, str | Path | None]:
    """``(model, adapter)`` to load: a LoRA/QLoRA run dir given alone as the model is its recorded base plus
    itself as the adapter."""
    from stagereason.modeling import recorded_base

    run = Path(path)
    if adapter is None and (run / "adapter_config.json").is_file() and not (run / "config.json").is_file():
        base = recorded_base(run)
        if not base:
            raise ValueError(f"{run} is an adapter run dir that does not record its base model; pass the base "
                             "as the model and this dir as the adapter")
        return base, run
    return path, adapter


def check_search_before_loading(path: str | Path, adapter: str | Path | None, search: str) -> None:
    """Refuse a search the model cannot run from its config alone, before it loads (an adapter run dir: its
    recorded base's config); a config that cannot be read is left to loading, which names the problem."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(_base_and_adapter(path, adapter)[0]).model_type
    except (OSError, ValueError):
        return
    if model_type != "mllama":
        _refuse_search(model_type, search)


def _checked(question: str | list[dict], processor, specials, n_images: int | None = None) -> str | list[dict]:
    """``Reasoner.check_question`` with the processor and its :func:`structural_special_tokens` given."""
    if not isinstance(question, list):
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        problem = written_special_token(question, specials)
        if problem:
            raise ValueError(f"the question {problem}")
        return question.strip()
    if not question:
        raise ValueError("the conversation is empty")
    messages, places = [], 0
    for k, msg in enumerate(question):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {k + 1} of the conversation is not a chat message with role system, user "
                             "or assistant")
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not all(isinstance(p, dict) and (p.get("type") == "image" or (
                p.get("type") == "text" and isinstance(p.get("text"), str))) for p in parts):
            raise ValueError(f"message {k + 1} ({msg['role']}): its content is neither a string nor a list of "
                             '{"type": "text", "text": ...} and {"type": "image"} parts')
        places += sum(p["type"] == "image" for p in parts)
        messages.append({**msg, "content": parts})
    problem = special_token_in_messages(messages, specials)
    if problem:
        raise ValueError(f"the conversation: {problem}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the conversation's last message is the {messages[-1]['role']}'s; it must be the user "
                         "turn to answer")
    if not any(p["type"] == "text" and p["text"].strip() for p in messages[-1]["content"]):
        raise ValueError("the question is empty")
    if n_images is not None and places != n_images:
        raise ValueError(f"the conversation marks {places} place(s) for images ({{\"type\": \"image\"}} parts) and "
                         f"{n_images} image(s) go with it")
    from jinja2 import TemplateError

    from stagereason.infer.generate import prompt_text

    try:
        prompt_text(processor, messages)
    except TemplateError as err:
        raise ValueError(f"the model's chat template refuses the conversation: {err}") from err
    return messages


def _needs_chat_template(processor) -> None:
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the model's processor has no chat template: stagereason needs one to build prompts")


def _usage(log: list[dict], encode_s: float, seconds: float, **info) -> dict:
    """Tokens and seconds per stage (summed over its rounds) and in all, plus what ran."""
    per_stage = {e["stage"]: {"tokens": sum(r["tokens"] for r in e["rounds"]),
                              "seconds": round(sum(r["seconds"] for r in e["rounds"]), 4)} for e in log}
    return {"per_stage": per_stage, "encode_seconds": round(encode_s, 4),
            "total_tokens": sum(v["tokens"] for v in per_stage.values()), "seconds": round(seconds, 4), **info}
