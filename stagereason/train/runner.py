"""``stagereason train``: TRL SFT of a VLM on staged traces — QLoRA (default), LoRA or full fine-tuning.

setup (validate data, lengths, model, trainer) -> run (``trainer.train``,
resumable) -> save (weights, processor, resolved config, run info,
``train_summary.json``, ``loss.png``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from stagereason.config import did_you_mean
from stagereason.stages import TraceFormatError, answers_match, parse_trace
from stagereason.train.data import Row, load_rows, open_image, split_rows, to_dataset

__all__ = ["TrainConfig", "TrainSetup", "build_trainer", "run_train", "StageSFTTrainer"]

logger = logging.getLogger(__name__)
TEXT_DECODER_TARGETS = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
# what an evaluation logs (each as eval_<name>): the Trainer's and TRL's, and the stage-aware evaluation's
EVAL_METRICS = {"loss", "runtime", "samples_per_second", "steps_per_second", "entropy", "mean_token_accuracy",
                "num_tokens", "aux_loss"}
STAGE_METRICS = {"format_rate", "accuracy", "text_only_accuracy"}
REPORT_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml", "azure_ml": "azureml-core"}


def _f(default, help):  # noqa: A002 - argparse's word
    return dataclasses.field(default=default, metadata={"help": help})


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _accelerator_available() -> bool:
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6; before it, CUDA is the accelerator TRL uses
    return accel.is_available() if hasattr(accel, "is_available") else torch.cuda.is_available()


@dataclasses.dataclass
class TrainConfig(SFTConfig):
    """Options of ``stagereason train``: ours below, plus every field of TRL's ``SFTConfig``."""

    model_name_or_path: str = _f("runs/tiny", "Base model: a hub name or local directory.")
    dataset: str = _f("runs/synthetic", "A gen output dir, a data.jsonl/.json, or a HF dataset in the LLaVA-CoT "
                                        "layout.")
    image_root: str | None = _f(None, "Folder the rows' image paths are relative to (default: the data file's).")
    eval_split: str = _f("0.05", "Held-out rows: a fraction, a count, a dataset path, or 'none'.")
    peft: Literal["qlora", "lora", "none"] = _f("qlora", "qlora: 4-bit base + LoRA; lora: full-precision base + "
                                                         "LoRA; none: full fine-tuning.")
    lora_r: int = _f(16, "LoRA rank: higher = more capacity and memory.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (effective scale alpha/r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA path.")
    lora_target_modules: str = _f(TEXT_DECODER_TARGETS, "Regex of modules to adapt; the default is the text "
                                                        "decoder's projections, cross-attention included.")
    vision_lora: bool = _f(False, "Also adapt every linear layer of the vision encoder (attention and MLP; "
                                  "Qwen-VL's merger too).")
    freeze_vision_tower: bool = _f(False, "Full fine-tuning (--peft none): keep the vision tower's weights as "
                                          "loaded; the projector and text decoder train. (LoRA leaves the tower "
                                          "frozen unless --vision_lora.)")
    attn_implementation: str = _f("auto", "auto (FlashAttention-2 where supported, else SDPA), sdpa, eager, ...")
    max_image_tiles: int | None = _f(None, "Cap on image tiles per image (Mllama): images shrink to fit them (lower "
                                           "resolution; the model still pads to its own tile count).")
    max_image_side: int | None = _f(None, "Cap on an image's longest side before processing (default: tile size "
                                          "x max tiles).")
    chat_template_path: str | None = _f(None, "Training chat template with generation markers (default: "
                                              "built in for Llama-3.2-Vision, TRL's for other models).")
    skip_invalid: bool = _f(False, "Drop and count invalid rows instead of stopping before training.")
    overwrite_output_dir: bool = _f(False, "Replace a non-empty output_dir.")
    dry_run: bool = _f(False, "Print the resolved config, dataset summary and estimated steps, then exit.")
    stage_eval_samples: int = _f(32, "Held-out examples generated at each evaluation for format rate and accuracy.")
    stage_eval_max_new_tokens: int = _f(384, "Token cap of those generations.")
    json: bool = _f(False, "Print the final summary as one JSON object.")
    # SFTConfig fields with our defaults
    output_dir: str | None = _f("runs/train", "Where the run writes everything.")
    max_length: int | None = _f(2048, "Rows longer than this (in tokens) are dropped and counted, never truncated.")
    assistant_only_loss: bool = _f(True, "Loss only on assistant text and its end-of-turn token.")
    gradient_checkpointing_kwargs: dict | str | None = _f('{"use_reentrant": false}',
                                                         "Non-reentrant checkpointing by default.")
    remove_unused_columns: bool = _f(False, "Keep the messages/images columns for the collator.")
    learning_rate: float = _f(2e-4, "2e-4 suits LoRA; full fine-tuning of the 11B model wants about 1e-5.")
    num_train_epochs: float = _f(1.0, "Passes over the data.")
    per_device_train_batch_size: int = _f(2, "Rows per device per step.")
    logging_steps: float = _f(10, "Log every N steps.")
    save_steps: float = _f(200, "Checkpoint every N steps (resume with --resume_from_checkpoint auto).")
    save_total_limit: int | None = _f(2, "Checkpoints kept.")
    resume_from_checkpoint: str | None = _f(None, "Resume: a checkpoint-N folder, or 'auto' for the newest complete "
                                                  "checkpoint in output_dir (none there: start afresh).")

    def __post_init__(self):
        if self.freeze_vision_tower and self.vision_lora:
            raise ValueError("--freeze_vision_tower and --vision_lora contradict each other: choose one")
        if self.peft != "none" and _env_true("ACCELERATE_USE_FSDP") and _env_true("FSDP_ACTIVATION_CHECKPOINTING"):
            # FSDP's checkpoint wrappers rename the layers; PEFT then finds no adapter weight to save, and every
            # checkpoint and the final adapter come out empty
            raise ValueError(f"--peft {self.peft} under FSDP with fsdp_activation_checkpointing: true would save empty "
                             "adapters (PEFT cannot find them inside FSDP's checkpoint wrappers): set "
                             "fsdp_activation_checkpointing: false in the accelerate config and pass "
                             "--gradient_checkpointing true (as train/accelerate/fsdp.yaml and the recipes do)")
        if self.activation_offloading and not _accelerator_available():
            # TRL's offloading moves saved activations from the accelerator to host memory; with none it fails deep
            # in the trainer, after the model has loaded
            raise ValueError("--activation_offloading moves activations from the GPU to host memory, and no GPU is "
                             "visible: drop it on the CPU")
        if isinstance(self.gradient_checkpointing_kwargs, str):
            try:
                self.gradient_checkpointing_kwargs = json.loads(self.gradient_checkpointing_kwargs)
            except ValueError as err:
                raise ValueError(f"--gradient_checkpointing_kwargs {self.gradient_checkpointing_kwargs!r} is not a "
                                 f"JSON object ({err})") from err
        try:
            split = float(self.eval_split)
        except (TypeError, ValueError):
            split = None  # a dataset path, or "none"
        if split is not None and split > 1 and not split.is_integer():
            raise ValueError(f"--eval_split {self.eval_split}: a fraction is below 1, a row count is a whole number")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs} with --max_steps {self.max_steps}: "
                             "nothing to train; give a positive one")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"--max_length {self.max_length}: must be at least 1 (leave it out for no limit)")
        if self.peft != "none" and self.lora_r < 1:
            raise ValueError(f"--lora_r {self.lora_r}: the LoRA rank must be at least 1")
        # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*; both names work here,
        # the new one winning, without the deprecation warning that SFTConfig's own default would raise
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new, None) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        if not torch.cuda.is_available():
            for flag in ("bf16", "fp16"):
                if getattr(self, flag):
                    logger.warning("--%s is ignored: no GPU is visible, and training on the CPU runs in fp32", flag)
            self.bf16, self.fp16 = False, False  # fp32 on the CPU
        if self.max_steps == 0:
            self.max_steps = -1  # train by epochs (transformers trains a step at learning rate 0 when it is 0)
        for flag, what in (("packing", "pack rows with images together"),
                           ("padding_free", "train rows with images padding-free")):
            if getattr(self, flag, False):
                raise ValueError(f"--{flag}: TRL does not {what} (each row keeps its own images and image-token "
                                 "masks); leave it off")
        if getattr(self, "use_liger_kernel", False) and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("--use_liger_kernel needs the liger-kernel package: pip install liger-kernel")
        super().__post_init__()
        self._check_reporting()
        self._check_best_model_metric()

    def _check_reporting(self) -> None:
        """Each ``--report_to`` integration's package is installed (else the trainer fails after the model loads)."""
        from transformers.integrations import integration_utils

        for name in self.report_to or []:
            for check in (f"is_{name}_available", f"is_{name.replace('_ml', '')}_available",
                          f"is_{name.replace('_', '')}_available"):
                available = getattr(integration_utils, check, None)
                if available is not None:
                    if not available():
                        raise ValueError(f"--report_to {name}: its package is not installed (pip install "
                                         f"{REPORT_PACKAGES.get(name, name)}), or choose another (none: no logger)")
                    break

    def _check_best_model_metric(self) -> None:
        """``--metric_for_best_model`` names a metric the evaluations log (else the first evaluation fails)."""
        if not self.metric_for_best_model:
            return
        if self.load_best_model_at_end and str(self.eval_split).lower() == "none":
            raise ValueError("--load_best_model_at_end needs held-out rows to evaluate: set --eval_split")
        name = self.metric_for_best_model.removeprefix("eval_")
        if name in STAGE_METRICS and self.stage_eval_samples < 1:
            raise ValueError(f"--metric_for_best_model {self.metric_for_best_model}: the stage-aware evaluation "
                             "that logs it is off; set --stage_eval_samples above 0, or choose eval_loss")
        known = sorted(EVAL_METRICS | STAGE_METRICS)
        hint = did_you_mean(name, known, cutoff=0.75)  # only near misses: other metrics may be logged too
        if name not in known and hint:
            raise ValueError(f"--metric_for_best_model {self.metric_for_best_model}: no evaluation logs it{hint}")

    def to_dict(self) -> dict:
        # one name per checkpointing option, the one the recipes use: a saved config re-run with
        # --no_gradient_checkpointing must not be overruled by a copy under transformers' newer name
        d = super().to_dict()
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if old in d and d.get(new) == d[old]:
                d.pop(new)
        # transformers hides every *_token value behind a "<NAME>" placeholder: TRL's pad and eos tokens are no
        # secrets, and a saved config must give them back; the hub token stays hidden when there is one
        for name in ("pad_token", "eos_token"):
            if name in d:
                d[name] = getattr(self, name)
        if self.hub_token is None:
            d["hub_token"] = None
        return d


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

        def item(i: int) -> tuple[list, str]:
            row = self.stage_rows[i]
            return [open_image(self.image_source(s), self.max_image_side, self.image_tiles) for s in row.images], \
                row.question

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


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (written last) is there and parses.

    A run killed while saving leaves its newest checkpoint incomplete; it is skipped.
    """
    found = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            return str(ckpt)
        except (OSError, ValueError):
            logger.warning("skipping %s: incomplete (interrupted while saving)", ckpt)
    return None


def _prepare_output_dir(cfg: TrainConfig) -> tuple[str | None, bool]:
    """Refuse a non-empty output dir unless resuming or overwriting.

    Returns ``(checkpoint to resume from, whether the old contents must go)``;
    nothing is removed here: ``build_trainer`` clears the dir only once the
    data and the model have loaded, so a failing run never costs the old one.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file; choose another --output_dir")
    resume = cfg.resume_from_checkpoint
    if resume == "auto":
        resume = last_complete_checkpoint(out) if out.is_dir() else None
        if resume is None and not (out.is_dir() and any(out.iterdir())):
            logger.info("no checkpoint in %s: starting from scratch", out)
    elif resume and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume} does not exist")
    if resume:
        _check_checkpoint_kind(Path(resume), cfg.peft)
    if out.is_dir() and any(out.iterdir()) and resume is None and not cfg.dry_run:
        if not cfg.overwrite_output_dir:
            how = ("it holds no complete checkpoint to resume from" if cfg.resume_from_checkpoint == "auto"
                   else "pass --resume_from_checkpoint auto to resume")
            raise FileExistsError(f"output_dir {out} is not empty; {how}; pass --overwrite_output_dir to replace "
                                  "it, or choose another --output_dir")
        inside = [f"--{name} {value}" for name, value in _input_paths(cfg) if _within(value, out)]
        if inside:
            raise FileExistsError(f"--overwrite_output_dir would delete {out}, which holds this run's input "
                                  f"({', '.join(inside)}); choose another --output_dir")
        return resume, True
    return resume, False


def _deepspeed_trained_names(ckpt: Path) -> list[str]:
    """The trained parameters a DeepSpeed checkpoint holds, from its small per-rank model-states file."""
    tag = (ckpt / "latest").read_text().strip()
    states = sorted((ckpt / tag).glob("*model_states.pt"))
    if not states:
        raise ValueError(f"--resume_from_checkpoint {ckpt}: its 'latest' file names {tag!r}, which holds no "
                         "DeepSpeed model states (*model_states.pt): the checkpoint is incomplete")
    try:  # DeepSpeed's own pickle (config, shapes), which resuming loads the same way
        shapes = torch.load(states[0], map_location="cpu", weights_only=False).get("param_shapes") or []
    except Exception as err:  # noqa: BLE001 - any unreadable file: the checkpoint is not usable
        raise ValueError(f"--resume_from_checkpoint {ckpt}: {states[0].name} cannot be read "
                         f"({type(err).__name__}: {err})") from None
    return [name for group in (shapes if isinstance(shapes, list) else [shapes]) for name in group]


def _check_checkpoint_kind(ckpt: Path, peft: str) -> None:
    """A checkpoint must hold what this run trains: an adapter for LoRA/QLoRA, full weights for --peft none."""
    adapter = (ckpt / "adapter_config.json").is_file()
    full = (ckpt / "model.safetensors").is_file() or (ckpt / "model.safetensors.index.json").is_file()
    sharded = ckpt / "pytorch_model_fsdp_0"  # an FSDP checkpoint: its index names the weights it holds
    if sharded.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        try:
            names = list(FileSystemReader(str(sharded)).read_metadata().state_dict_metadata)
        except Exception as err:  # noqa: BLE001 - any unreadable index: the checkpoint is not usable
            raise ValueError(f"--resume_from_checkpoint {ckpt}: its FSDP weights in {sharded.name} cannot be read "
                             f"({type(err).__name__}: {err})") from None
        adapter = adapter or any(".lora_" in n for n in names)
        full = full or (bool(names) and not adapter)
    elif not (adapter or full) and (ckpt / "latest").is_file():  # DeepSpeed's own checkpoint, weights partitioned
        names = _deepspeed_trained_names(ckpt)
        adapter = any(".lora_" in n for n in names)
        full = bool(names) and not adapter
    if peft == "none" and adapter:
        raise ValueError(f"--resume_from_checkpoint {ckpt} holds a LoRA adapter, and this run is --peft none (full "
                         "fine-tuning): resume with the run's own --peft, or start afresh in another --output_dir")
    if peft != "none" and full and not adapter:
        raise ValueError(f"--resume_from_checkpoint {ckpt} holds full weights (a --peft none run), and this run is "
                         f"--peft {peft}: resume with --peft none, or start afresh in another --output_dir")


def _input_paths(cfg: TrainConfig) -> list[tuple[str, str]]:
    return [(name, value) for name in ("dataset", "model_name_or_path", "image_root", "eval_split",
                                       "chat_template_path")
            if isinstance(value := getattr(cfg, name), str) and value]


def _within(path: str, folder: Path) -> bool:
    p = Path(path)
    if not p.exists():  # a hub name, a fraction: nothing on disk to lose
        return False
    p, folder = p.resolve(), folder.resolve()
    return p == folder or folder in p.parents


def _token_lengths(rows: list[Row], processor, template: str, report, skip_invalid: bool) -> list[Row]:
    """Count each row's tokens; rows the chat template refuses are named (or dropped, counted, with --skip_invalid).

    Returns the rows the template renders.
    """
    from jinja2 import TemplateError

    tok = processor.tokenizer
    texts, kept, refused = [], [], []
    for r in rows:
        try:
            texts.append(processor.apply_chat_template(r.messages, tokenize=False, chat_template=template))
            kept.append(r)
        except TemplateError as err:  # e.g. Llama-3.2-Vision's: "Prompting with images is incompatible with system
            refused.append(r)         # messages."
            report.add(r.id, "chat template", str(err))
    if refused and not skip_invalid:
        shown = "; ".join(f"row {r.id}: {report.problems[r.id][-1]}" for r in refused[:5])
        raise ValueError(f"{len(refused)} row(s) of the dataset are refused by the model's chat template: {shown}"
                         f"{' ...' if len(refused) > 5 else ''}; pass --skip_invalid to drop them")
    if refused:
        logger.warning("dropped %d row(s) the chat template refuses (--skip_invalid)", len(refused))
    for r, ids in zip(kept, tok(texts, add_special_tokens=False)["input_ids"] if texts else [], strict=True):
        r.n_tokens = len(ids)
    return kept


def _add_image_tokens(rows: list[Row], processor, source, max_side: int, template: str | None = None,
                      workers: int = 8) -> None:
    """Add to each row's token count the tokens its images expand to (LLaVA-NeXT, Qwen-VL: hundreds or thousands
    per image, from the image's size); Mllama's processor keeps one token per image, counted already.

    Sizes come from the image headers, as the collator will size the images (EXIF turns, ``max_side``). The
    processor's count is of image tokens only; what it writes around each image (Gemma 3: begin/end-of-image
    tokens and blank lines) is measured once, on one row with one image run through the processor.
    """
    from concurrent.futures import ThreadPoolExecutor

    from stagereason.train.data import image_size

    count = getattr(processor, "_get_num_multimodal_tokens", None)
    refs = list(dict.fromkeys(ref for r in rows for ref in r.images))
    if count is None or not refs:
        return
    resolve = source or (lambda ref: ref)
    with ThreadPoolExecutor(workers) as pool:
        sizes = dict(zip(refs, pool.map(lambda ref: image_size(resolve(ref), max_side), refs), strict=True))
    try:
        tokens = count(image_sizes=[(h, w) for w, h in sizes.values()]).num_image_tokens
    except Exception as err:  # noqa: BLE001 - a processor whose count needs more than sizes: text tokens only
        logger.warning("token lengths leave out the image tokens (%s cannot count them: %s); max_length compares "
                       "text tokens only", type(processor).__name__, err)
        return
    per_image = dict(zip(sizes, tokens, strict=True))
    around = 0
    probe = next((r for r in rows if len(r.images) == 1), None)
    if probe is not None and template is not None:
        try:
            text = processor.apply_chat_template(probe.messages, tokenize=False, chat_template=template)
            image = open_image(resolve(probe.images[0]), max_side)
            real = len(processor(text=[text], images=[image], add_special_tokens=False)["input_ids"][0])
            around = real - (probe.n_tokens + per_image[probe.images[0]] - 1)
        except Exception as err:  # noqa: BLE001 - the collator will say what is wrong; lengths stay a bit short
            logger.warning("token lengths leave out what %s writes around each image (measuring it on row %s "
                           "failed: %s)", type(processor).__name__, probe.id, err)
    for r in rows:  # the placeholder itself is counted already
        r.n_tokens += sum(per_image[ref] - 1 + around for ref in r.images)


def _dataset_summary(rows: list[Row], kept: list[Row], eval_rows: list[Row], report, cfg: TrainConfig) -> dict:
    lens = np.array([r.n_tokens for r in rows]) if rows else np.array([0])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # as the Trainer counts: batches per epoch, updates per epoch (rounded up), then epochs (rounded up)
    batches = -(-len(kept) // (cfg.per_device_train_batch_size * world))
    per_epoch = max(-(-batches // cfg.gradient_accumulation_steps), 1)
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    return {
        "rows": report.rows, "invalid_dropped": len(report.problems), "train_rows": len(kept),
        "eval_rows": len(eval_rows), "too_long_dropped": len(rows) - len(kept) - len(eval_rows),
        "images": sum(len(r.images) for r in rows),
        "tokens_p50": int(np.percentile(lens, 50)), "tokens_p95": int(np.percentile(lens, 95)),
        "tokens_max": int(lens.max()), "max_length": cfg.max_length, "estimated_steps": steps,
    }


def _peft_config(cfg: TrainConfig, model=None):
    """LoRA on ``--lora_target_modules``; with ``--vision_lora`` also on every linear layer of ``model``'s vision
    encoder, named exactly (their names differ between VLMs: Mllama's q/k/v/o_proj and fc1/fc2, Qwen-VL's qkv,
    proj and MLP projections, SigLIP's out_proj...)."""
    if cfg.peft == "none":
        return None
    from peft import LoraConfig

    from stagereason.modeling import vision_linear_names

    target = cfg.lora_target_modules
    if cfg.vision_lora:
        names = vision_linear_names(model)
        if not names:
            raise ValueError(f"--vision_lora: {cfg.model_name_or_path} has no vision encoder with linear layers "
                             "(looked for a module named vision_model, vision_tower or visual)")
        target = "|".join([target, *(re.escape(n) for n in names)])
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")


def _versions() -> dict:
    import accelerate
    import peft
    import transformers
    import trl

    import stagereason

    info = {"stagereason": stagereason.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "python": sys.version.split()[0]}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return info


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    mean = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    elif mean:  # a run shorter than --logging_steps logs no step loss: its mean, at its last step
        ax.plot(*mean[-1], "s", label="mean train loss (no step logged: fewer steps than --logging_steps)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if train or mean or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _eos_ids(model) -> tuple[int, ...]:
    """The tokens that end a generated turn, from the model's generation config."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _peak_memory_gb() -> float:
    """This process's peak (CUDA reserved, else max RSS); in a distributed run, the largest of all processes'."""
    if torch.cuda.is_available():
        peak = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    else:
        import resource

        peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB -> GiB
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        peaks: list = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
        peak = max(peaks)
    return peak


def _save(cfg: TrainConfig, trainer: StageSFTTrainer, processor, info: dict, summary_data: dict,
          runtime: float, first_step: int = 0) -> dict:
    """Write the run directory; ``runtime`` and the rates cover this run's steps (after ``first_step`` if resumed).

    Every process calls it (sharded weights are gathered from all of them); one writes.
    """
    from stagereason.config import dump_config
    from stagereason.data_gen.records import atomic_write_text

    out = Path(cfg.output_dir)
    if trainer.is_fsdp_enabled:
        # checkpoints stay sharded (fast, resumable on the same number of GPUs); the run's weights are saved whole,
        # loadable anywhere. Under SHARDED_STATE_DICT the Trainer's save_model would write no weights at all.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    elif trainer.is_deepspeed_enabled and trainer.deepspeed is not None \
            and trainer.deepspeed.zero_optimization_partition_weights():
        # the same under ZeRO-3: without stage3_gather_16bit_weights_on_model_save the Trainer's save_model
        # writes only DeepSpeed's own partitioned checkpoint (weights no loader reads) into the run dir
        trainer.deepspeed._config.zero_config.gather_16bit_weights_on_model_save = True
    trainer.save_model(str(out))
    if trainer.args.should_save and cfg.peft != "none":
        _check_adapter_saved(out)
    history = trainer.state.log_history
    # the last logged loss, else the run's mean (a run shorter than logging_steps logs no step loss)
    losses = [h["loss"] for h in history if "loss" in h] or [h["train_loss"] for h in history if "train_loss" in h]
    stage = [h for h in history if "eval_format_rate" in h]
    # this run's steps only (a resumed run counts from where it resumed), all processes, filler rows left out
    samples, tokens = trainer.seen()
    processes = trainer.args.world_size
    kind = "cuda max reserved" if torch.cuda.is_available() else "process max RSS"
    summary = {
        "steps": trainer.state.global_step, "resumed_from_step": first_step,
        "final_train_loss": losses[-1] if losses else None,
        "train_runtime_s": round(runtime, 3), "eval_runtime_s": round(trainer.eval_seconds, 2),
        "train_samples": samples, "train_tokens": tokens,
        "samples_per_s": round(samples / max(runtime, 1e-9), 3),
        "tokens_per_s": round(tokens / max(runtime, 1e-9), 1) if tokens else None,
        "processes": processes,
        "peak_memory_gb": _peak_memory_gb(),
        "peak_memory_kind": kind if processes == 1 else f"{kind}, the largest of the {processes} processes'",
        "eval": {"format_rate": stage[-1]["eval_format_rate"], "accuracy": stage[-1]["eval_accuracy"],
                 "text_only_accuracy": stage[-1].get("eval_text_only_accuracy"),
                 "samples": len(trainer.stage_rows)} if stage else None,
        "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
        "dataset": summary_data,
    }
    if cfg.load_best_model_at_end:  # the checkpoint whose weights were saved, and its metric
        summary.update(best_model_checkpoint=trainer.state.best_model_checkpoint,
                       best_metric=trainer.state.best_metric)
    if not trainer.args.should_save:
        return summary
    processor.save_pretrained(str(out))
    dump_config((cfg,), out / "train_config.yaml")
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "run_info.json", json.dumps(info, indent=2) + "\n")
    if trainer.stage_samples:
        atomic_write_text(out / "eval_samples.jsonl",
                          "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in trainer.stage_samples))
    if history:
        _plot_loss(history, out / "loss.png")
    return summary


def _check_adapter_saved(out: Path) -> None:
    """An adapter file without tensors is a wrapper hiding the adapter from PEFT: an error, not a finished run."""
    from safetensors import safe_open

    path = out / "adapter_model.safetensors"
    if not path.is_file():
        return  # saved in another format (e.g. ZeRO-3 without 16-bit weights gathered): the Trainer has said so
    with safe_open(str(path), framework="pt") as f:
        if not list(f.keys()):
            raise RuntimeError(f"{path} holds no adapter weights: PEFT found none to save (a wrapper, such as FSDP's "
                               "activation checkpointing, hides them); the training in this run is lost")


def _load(cfg: TrainConfig, processor):
    from stagereason.modeling import load_model, vision_tower

    quant = "4bit" if cfg.peft == "qlora" else None
    model, processor = load_model(cfg.model_name_or_path, quantization=quant,
                                  attn_implementation=cfg.attn_implementation,
                                  dtype="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32", processor=processor)
    # No prepare_model_for_kbit_training for QLoRA: it casts every weight it does not quantize to float32 (vision
    # tower, projector, embeddings, lm_head of Llama-3.2-11B-Vision: +3.8 GB for nothing under bf16 autocast).
    # get_peft_model freezes the base; Trainer.train turns checkpointing on.
    if cfg.freeze_vision_tower:
        tower = vision_tower(model)
        if tower is None:
            raise ValueError(f"--freeze_vision_tower: {cfg.model_name_or_path} ({type(model).__name__}) has no "
                             "vision tower (no module named vision_model, vision_tower or visual)")
        tower.requires_grad_(False)
    return model, processor


@dataclasses.dataclass
class TrainSetup:
    """What ``build_trainer`` prepared: the trainer and what the run directory will describe."""

    trainer: StageSFTTrainer | None
    processor: object
    info: dict
    data: dict
    resume: str | None


def build_trainer(cfg: TrainConfig) -> TrainSetup:
    """Validate the data, drop over-long rows, load the model and build the trainer (``trainer`` is None on dry runs).

    Everything that can fail on the data fails before the model is loaded.
    """
    from transformers import AutoConfig

    from stagereason.modeling import load_processor
    from stagereason.train.collate import StageCollator
    from stagereason.train.templates import training_chat_template

    resume, clear = _prepare_output_dir(cfg)
    rows, rep, source = load_rows(cfg.dataset, cfg.image_root, skip_invalid=cfg.skip_invalid)
    train_rows, eval_rows = split_rows(rows, cfg.eval_split, cfg.seed, cfg.image_root, source,
                                       skip_invalid=cfg.skip_invalid)
    model_config = AutoConfig.from_pretrained(cfg.model_name_or_path)
    most = getattr(getattr(model_config, "vision_config", None), "max_num_tiles", None)
    if cfg.max_image_tiles is not None and most is None:
        raise ValueError(f"--max_image_tiles: {cfg.model_name_or_path} does not cut images into tiles; cap image "
                         "size with --max_image_side instead")
    if cfg.max_image_tiles is not None and not 1 <= cfg.max_image_tiles <= most:
        raise ValueError(f"--max_image_tiles {cfg.max_image_tiles}: {cfg.model_name_or_path} takes 1 to {most} "
                         "tiles per image")
    processor = load_processor(cfg.model_name_or_path, model_config.model_type)
    template = training_chat_template(processor, model_config.model_type, cfg.chat_template_path)
    rendered = {id(r) for r in _token_lengths(train_rows + eval_rows, processor, template, rep, cfg.skip_invalid)}
    tile = (getattr(processor.image_processor, "size", {}) or {}).get("height", 560)
    most = getattr(processor.image_processor, "max_image_tiles", None)
    max_side = cfg.max_image_side or tile * (most or 4)
    _add_image_tokens([r for r in train_rows + eval_rows if id(r) in rendered], processor, source, max_side,
                      template)
    train_rows = [r for r in train_rows if id(r) in rendered]
    eval_rows = [r for r in eval_rows if id(r) in rendered]
    limit = cfg.max_length or 10**9
    kept, eval_kept = [r for r in train_rows if r.n_tokens <= limit], [r for r in eval_rows if r.n_tokens <= limit]
    data = _dataset_summary(train_rows + eval_rows, kept, eval_kept, rep, cfg)
    if cfg.dry_run:
        return TrainSetup(None, processor, {}, data, resume)
    if not kept:
        raise ValueError(f"no training rows left in {cfg.dataset} (invalid: {len(rep.problems)}, "
                         f"longer than max_length {cfg.max_length}: {data['too_long_dropped']})")
    if data["too_long_dropped"]:
        logger.warning("dropped %d rows longer than max_length=%d tokens (never truncated through the image)",
                       data["too_long_dropped"], cfg.max_length)
    model, processor = _load(cfg, processor)  # the processor loaded above for the token counts
    # fewer tiles than the model takes: shrink images to fit them (the model still pads to its own count)
    tiles = (tile, cfg.max_image_tiles) if cfg.max_image_tiles and most and cfg.max_image_tiles < most else None
    collator = StageCollator(processor, template, max_side, getattr(model_config.get_text_config(), "vocab_size",
                                                                    None),
                             assistant_only=cfg.assistant_only_loss, source=source, tiles=tiles,
                             stop_ids=_eos_ids(model), vision_every_batch=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    user_assistant_only = cfg.assistant_only_loss
    cfg.assistant_only_loss = False  # our collator masks; TRL must not swap in its own template
    try:
        trainer = StageSFTTrainer(
            model=model, args=cfg, train_dataset=to_dataset(kept),
            eval_dataset=to_dataset(eval_kept) if eval_kept else None, processing_class=processor,
            data_collator=collator, peft_config=_peft_config(cfg, model),
            stage_rows=eval_kept[: cfg.stage_eval_samples], stage_max_new_tokens=cfg.stage_eval_max_new_tokens,
            text_only_guess=text_only_guesser(kept),
            max_image_side=max_side, image_source=source, image_tiles=tiles,
        )
    finally:
        cfg.assistant_only_loss = user_assistant_only
    if clear:  # data, model and trainer are in hand: only now does the previous run go, removed by one process
        with cfg.main_process_first(desc="removing the previous run"):
            if cfg.process_index == 0:
                logger.warning("removing the previous contents of %s (--overwrite_output_dir)", cfg.output_dir)
                shutil.rmtree(cfg.output_dir)
    info = {"base_model": cfg.model_name_or_path, "model_type": model_config.model_type, "peft": cfg.peft,
            "quantization": "4bit-nf4" if cfg.peft == "qlora" else None,
            "precision": "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32",
            "attention": model.config._attn_implementation, "dataset": cfg.dataset,
            "versions": _versions(), "git_revision": _git_revision(), "resumed_from": resume,
            "processes": cfg.world_size, "distributed": str(trainer.accelerator.distributed_type.value)}
    return TrainSetup(trainer, processor, info, data, resume)


def _checkpoint_step(ckpt: str | None) -> int:
    if not ckpt:
        return 0
    try:
        return int(json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("global_step", 0))
    except (OSError, ValueError):
        return 0


def _last_evaluation_is_stale(trainer) -> bool:
    """No evaluation has seen the weights the run ends with: none ran, the last one ran before the final step, or
    the best checkpoint (``--load_best_model_at_end``) was loaded back over later weights."""
    state = trainer.state
    evals = [h["step"] for h in state.log_history if "eval_loss" in h]
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    return not evals or evals[-1] != state.global_step or (best is not None and _checkpoint_step(best) !=
                                                           state.global_step)


def _leave_process_group() -> None:
    """Under a launcher, every process waits for the others, then leaves the process group before its interpreter
    exits (one process once aborted in its exit, "terminate called without an active exception", while another was
    still writing the run dir)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_command(cfg: TrainConfig) -> dict | int:
    """The ``stagereason train`` verb: :func:`run_train`, then (under a launcher) the processes leave together.
    After an error the launcher stops the other processes."""
    result = run_train(cfg)
    _leave_process_group()
    if "stopped_by" in result:  # stopped by a signal, with a checkpoint: the shell's status for that signal
        return result["exit_status"]
    return result


def run_train(cfg: TrainConfig) -> dict:
    """``stagereason train``: setup -> train (resumable) -> save a self-describing run directory."""
    from stagereason.console import report

    setup = build_trainer(cfg)
    if cfg.dry_run:
        import yaml

        if cfg.process_index != 0:  # under a launcher, one process prints
            return setup.data
        if cfg.json:  # one object: the dataset summary, and the resolved config under "config"
            report("", {**setup.data, "config": cfg.to_dict()}, as_json=True)
            return setup.data
        print("# resolved config\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        report("dataset (dry run: nothing trained)", setup.data)
        return setup.data
    trainer = setup.trainer
    first_step = _checkpoint_step(setup.resume)
    start = time.perf_counter()
    stop = _StopOnSignal()
    trainer.add_callback(stop)
    stop.install()
    try:
        out = trainer.train(resume_from_checkpoint=setup.resume)
    finally:
        stop.uninstall()
        trainer.remove_callback(stop)
    if stop.received is not None and stop.stopped_at is None:
        logger.warning("the signal came after the last step: the run is saved as usual")
    if stop.stopped_at is not None and stop.stopped_at >= trainer.state.max_steps:
        logger.warning("the signal came at the last step: the run is saved as usual")
    elif stop.stopped_at is not None:  # stopped by a signal: a checkpoint, no run summary (the run is not done)
        ckpt = Path(cfg.output_dir) / f"checkpoint-{stop.stopped_at}"
        name = signal.Signals(stop.received).name if stop.received else "a signal to another process"
        if trainer.is_world_process_zero():
            print(f"stopped by {name} at step {stop.stopped_at} of {trainer.state.max_steps}: saved {ckpt}; the same "
                  "command with --resume_from_checkpoint auto goes on from there", file=sys.stderr)
        return {"stopped_by": name, "steps": stop.stopped_at, "checkpoint": str(ckpt),
                "exit_status": 128 + (stop.received or signal.SIGTERM)}
    # training only, this run's part: evaluations during training are left out
    runtime = out.metrics.get("train_runtime", time.perf_counter() - start) - trainer.eval_seconds
    if trainer.eval_dataset is not None and _last_evaluation_is_stale(trainer):
        trainer.evaluate()  # the summary's evaluation is of the weights saved, stage metrics included
    summary = _save(cfg, trainer, setup.processor, setup.info, setup.data, runtime, first_step)
    if not trainer.is_world_process_zero():  # under a launcher, one process prints
        return summary
    if trainer.stage_samples:
        sample = trainer.stage_samples[0]
        print(f"\nheld-out example {sample['id']}: {sample['question']}\n{sample['output']}\n"
              f"(standard answer: {sample['answer']})\n")
    shown = {k: v for k, v in summary.items() if k not in ("dataset", "eval")}
    if summary["eval"]:
        shown.update({"eval_format_rate": summary["eval"]["format_rate"],
                      "eval_accuracy": summary["eval"]["accuracy"],
                      "eval_text_only_accuracy": summary["eval"]["text_only_accuracy"]})
    report(f"trained: {cfg.output_dir}", shown, cfg.json)
    return summary
