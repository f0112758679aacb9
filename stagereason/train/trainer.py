"""The trainer of ``stagereason train``: TRL's SFTTrainer with stage-aware evaluation, strict checkpoint loading,
rows and tokens counted as they train, frozen towers kept out of the backward pass, and a clean stop on SIGTERM or
Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from stagereason.stages import TraceFormatError, answers_match, parse_trace
from stagereason.train.data import Row, open_image

__all__ = ["StageSFTTrainer", "text_only_guesser"]

logger = logging.getLogger(__name__)

def _frozen_towers_record_no_graph(model) -> None:
    """Remove the input-gradient hooks that make a frozen vision tower record a graph.

    With PEFT and checkpointing, SFTTrainer and ``Trainer.train`` call
    ``enable_input_require_grads``, which hooks the input embeddings of every
    sub-model, the vision tower's patch embedding included: the frozen tower
    then keeps activations for, and runs, a backward pass that only reaches
    frozen weights (GPU numbers for the 11B model in bench/RESULTS.md). Hooks
    stay on the embeddings of sub-models that train something (the text
    decoder; the vision tower too with ``--vision_lora``).
    """
    from transformers import PreTrainedModel

    subs = [m for m in model.modules() if isinstance(m, PreTrainedModel) and hasattr(m, "get_input_embeddings")]
    keep, frozen = set(), []
    for sub in subs:
        try:
            emb = sub.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        if emb is None:
            continue
        if any(p.requires_grad for p in sub.parameters()):
            keep.add(id(emb))
        else:
            frozen.append(emb)
    for emb in frozen:
        if id(emb) in keep:
            continue
        for key, hook in list(emb._forward_hooks.items()):
            if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
                del emb._forward_hooks[key]


class _FrozenTowers(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _frozen_towers_record_no_graph(model)


class _StopOnSignal(TrainerCallback):
    """SIGTERM (a scheduler's preemption, ``scancel``, ``kill``) or SIGINT (Ctrl-C) while training: finish the
    step (skipping an evaluation it would start), save a checkpoint and stop, so that
    ``--resume_from_checkpoint auto`` goes on from there. A second Ctrl-C stops at once (KeyboardInterrupt);
    more SIGTERMs are the same request (a launcher forwards the one a scheduler also sends its workers). Under
    a launcher the processes stop at the same step: the flag is reduced over them at each optimizer step. The
    dataloader workers ignore both signals (:class:`_WorkersIgnoreStopSignals`); a signal that was ignored when
    training started stays ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None  # the signal that asked for the stop
        self.stopped_at: int | None = None  # the step whose checkpoint ends the run
        self._previous: dict = {}
        self._pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only: a run started from another thread keeps Python's handling
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if current is not None and current != signal.SIG_IGN:  # None: set outside Python, not restorable
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a process forked from this one: the training process decides
            return
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C again: as if never caught
                self.uninstall()
                signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("%s: training stops after this step, with a checkpoint%s", signal.Signals(signum).name,
                       " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if args.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([float(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
        if stop:
            self.stopped_at = state.global_step
            control.should_save = True  # whatever the save strategy (with "best", only when evaluating)
            control.should_evaluate = False
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the loop's break still ends the epoch: no evaluation, no second save
            control.should_evaluate = control.should_save = False
        return control


class _WorkersIgnoreStopSignals:
    """A dataloader ``worker_init_fn`` that leaves SIGTERM and SIGINT to the training process (a scheduler or a
    terminal signals the whole process group): a worker killed by one ends the run with a DataLoader error
    instead of a checkpoint. The workers still end with the loader, or with the training process."""

    def __init__(self, init=None):
        self.init = init

    def __call__(self, worker_id: int) -> None:
        for sig in _StopOnSignal.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.init is not None:
            self.init(worker_id)


class StageSFTTrainer(SFTTrainer):
    """SFTTrainer whose evaluation also generates on held-out rows: format rate and conclusion accuracy."""

    def __init__(self, *args, stage_rows: list[Row] | None = None, stage_max_new_tokens: int = 384,
                 max_image_side: int | None = None, image_source=None, image_tiles=None, text_only_guess=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_dropout_fused = 0  # LoRA paths whose dropout keeps its input, not a copy (lora_dropout.py)
        if getattr(self.args, "lean_lora_dropout", False) and not (self.is_fsdp_enabled
                                                                          or self.is_deepspeed_enabled):
            from stagereason.train.lora_dropout import fuse_lora_dropout

            self.lora_dropout_fused = fuse_lora_dropout(self.model)
        # what the training answers alone get on the held-out rows, without the image: fixed, so computed once
        self.text_only_accuracy = None if text_only_guess is None or not stage_rows else sum(
            bool(r.answer) and answers_match(text_only_guess(r), r.answer) for r in stage_rows) / len(stage_rows)
        self.add_callback(_FrozenTowers())  # after Trainer.train() turns checkpointing (and its hooks) on
        self.stage_rows, self.stage_max_new_tokens = stage_rows or [], stage_max_new_tokens
        self.max_image_side, self.image_tiles = max_image_side, image_tiles
        self.image_source = image_source or (lambda ref: ref)
        self.stage_samples: list[dict] = []
        self._seen = None  # this process's [rows, tokens] trained on in this run (filler rows left out)
        self.eval_seconds = 0.0  # time spent in evaluations, to keep it out of the training rates

    def _get_dataloader(self, *args, **kwargs):
        loader = super()._get_dataloader(*args, **kwargs)
        inner = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates the DataLoader it holds
        if inner.num_workers:
            inner.worker_init_fn = _WorkersIgnoreStopSignals(inner.worker_init_fn)
        return loader

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels, mask = inputs.get("labels"), inputs.get("attention_mask")
        if labels is not None:
            real = (labels != -100).any(dim=1)  # a filler row (a launcher's batch without an image) has no label
            tokens = (mask * real[:, None]).sum() if mask is not None else real.sum() * labels.shape[1]
            counts = torch.stack([real.sum(), tokens]).long()  # stays on the device: no sync per step
            self._seen = counts if self._seen is None else self._seen + counts
        return super().training_step(model, inputs, num_items_in_batch)

    def seen(self) -> tuple[int, int]:
        """Rows and (non-padding) tokens trained on in this run, all processes together; every process calls it."""
        counts = self._seen if self._seen is not None else torch.zeros(2, dtype=torch.long)
        counts = self.accelerator.reduce(counts.to(self.args.device), reduction="sum")
        return int(counts[0]), int(counts[1])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's checkpoint loading, made strict.

        Full weights are saved under the checkpoint format's names (Mllama: ``language_model.model.*``), which the
        Trainer loads into the model's own names (``model.language_model.*``) non-strictly: nothing loads and a
        warning is all that shows. They are loaded here through the model's own renaming, and any weight left
        out is an error. Adapters and FSDP checkpoints go the Trainer's way; a shape mismatch names the checkpoint.
        """
        from transformers.trainer import _is_peft_model

        model = self.model if model is None else model
        ckpt = Path(resume_from_checkpoint)
        full = (ckpt / "model.safetensors").is_file() or (ckpt / "model.safetensors.index.json").is_file()
        if full and not self.is_fsdp_enabled and not _is_peft_model(model):
            _load_full_weights(model, ckpt)
            return
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise
            first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err))
            raise ValueError(f"checkpoint {ckpt} was saved from another base model than "
                             f"{self.args.model_name_or_path}: {first}") from None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        start = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.stage_rows:  # every process: the generations are split over them (and sharded weights need all)
            stage = {f"{metric_key_prefix}_{k}": v for k, v in self.stage_eval().items()}
            self.log(stage)
            metrics.update(stage)
        self.eval_seconds += time.perf_counter() - start
        return metrics

    def stage_eval(self) -> dict[str, float]:
        """Generate on the held-out rows; strict stage format and ``answers_match`` against their answers."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        from stagereason.infer.generate import generate_greedy_shared

        def item(i: int) -> tuple[list, list[dict]]:  # the conversation up to its last answer, as trained on
            row = self.stage_rows[i]
            last = max(k for k, m in enumerate(row.messages) if m["role"] == "assistant")
            return [open_image(self.image_source(s), self.max_image_side, self.image_tiles) for s in row.images], \
                row.messages[:last]

        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
        texts = generate_greedy_shared(self.model, self.processing_class, len(self.stage_rows), item,
                                       sharded=sharded, max_new_tokens=self.stage_max_new_tokens, batch_size=16)
        fmt = right = 0
        self.stage_samples = []
        for row, text in zip(self.stage_rows, texts, strict=True):
            try:
                conclusion, ok = parse_trace(text).conclusion, True
            except TraceFormatError:
                try:
                    conclusion, ok = parse_trace(text, strict=False).conclusion, False
                except TraceFormatError:
                    conclusion, ok = "", False
            good = bool(row.answer) and answers_match(conclusion, row.answer)
            fmt, right = fmt + ok, right + good
            self.stage_samples.append({"id": row.id, "question": row.question, "answer": row.answer,
                                       "output": text, "format_ok": ok, "correct": good})
        n = max(len(texts), 1)
        metrics = {"format_rate": fmt / n, "accuracy": right / n}
        if self.text_only_accuracy is not None:
            metrics["text_only_accuracy"] = self.text_only_accuracy
        return metrics


def _saved_names(model) -> dict[str, str]:
    """Each state-dict key of ``model`` -> its name in a saved checkpoint (``save_pretrained`` renames some)."""
    keys = list(model.state_dict())
    try:
        from transformers.core_model_loading import revert_weight_conversion

        probe = revert_weight_conversion(model, {k: torch.tensor(float(i)) for i, k in enumerate(keys)})
        return {keys[int(t.item())]: saved for saved, t in probe.items() if torch.is_tensor(t) and t.dim() == 0}
    except Exception as err:  # noqa: BLE001 - a private helper of transformers: without it, names are kept
        logger.debug("checkpoint names taken as the model's own: %s", err)
        return {k: k for k in keys}


def _load_full_weights(model, ckpt: Path) -> None:
    """Copy a full-weights checkpoint into ``model`` tensor by tensor; every weight must be there, shapes equal."""
    from safetensors import safe_open

    index = ckpt / "model.safetensors.index.json"
    files = ([ckpt / "model.safetensors"] if not index.is_file()
             else [ckpt / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())])
    own = model.state_dict()
    names = {saved: key for key, saved in _saved_names(model).items()}
    loaded: set[int] = set()  # data pointers: a tied weight is loaded with the one it shares storage with
    unexpected = []
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for saved in h.keys():
                    key = names.get(saved, saved if saved in own else None)
                    if key is None:
                        unexpected.append(saved)
                        continue
                    tensor = h.get_tensor(saved)
                    if tuple(tensor.shape) != tuple(own[key].shape):
                        raise ValueError(f"checkpoint {ckpt} was saved from another model: {saved} has shape "
                                         f"{tuple(tensor.shape)}, the model's {key} {tuple(own[key].shape)}")
                    own[key].copy_(tensor)
                    loaded.add(own[key].data_ptr())
    missing = [k for k, t in own.items() if t.data_ptr() not in loaded]
    if missing:
        raise ValueError(f"checkpoint {ckpt} lacks {len(missing)} weight(s) of the model (e.g. {missing[0]}): it was "
                         "saved from another model or is not a full-weights checkpoint")
    if unexpected:
        logger.warning("checkpoint %s holds %d weight(s) the model does not have (e.g. %s); ignored", ckpt,
                       len(unexpected), unexpected[0])
    logger.info("resumed weights from %s (%d tensors)", ckpt, len(own))


def text_only_guesser(train_rows: list[Row]):
    """The best guess from the question's text alone, learnt from the training rows.

    A held-out question gets the training rows' most frequent answer to the
    same question (case and spacing ignored); a question never seen gets the
    most frequent answer of its family, else of all rows. Stage-aware
    evaluation reports its accuracy beside the model's, so "above the
    text-only guess" is measured, not assumed.
    """
    from collections import Counter, defaultdict

    def key(q: str) -> str:
        return " ".join(q.lower().split())

    by_question: dict[str, Counter] = defaultdict(Counter)
    by_family: dict[str | None, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for r in train_rows:
        if r.answer:
            by_question[key(r.question)][r.answer] += 1
            by_family[r.family][r.answer] += 1
            overall[r.answer] += 1

    def guess(row: Row) -> str:
        for counts in (by_question.get(key(row.question)), by_family.get(row.family), overall):
            if counts:
                return counts.most_common(1)[0][0]
        return ""

    return guess

