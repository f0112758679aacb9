"""The options of ``stagereason train``: :class:`TrainConfig`, ours plus every field of TRL's ``SFTConfig``.

Checks that would otherwise fail only after the model has loaded (or fail
silently) are made here, when the config is parsed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from typing import Literal

import torch
from trl import SFTConfig

from stagereason.config import did_you_mean

__all__ = ["TrainConfig"]

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
    eval_split: str = _f("0.05", "Held-out rows: a fraction, a count (rows about the same images stay together), "
                                 "a dataset path, or 'none'.")
    eval_image_root: str | None = _f(None, "Folder a separate --eval_split dataset's image paths are relative to "
                                           "(default: --image_root, else that dataset's folder).")
    peft: Literal["qlora", "lora", "none"] = _f("qlora", "qlora: 4-bit base + LoRA; lora: full-precision base + "
                                                         "LoRA; none: full fine-tuning.")
    lora_r: int = _f(16, "LoRA rank: higher = more capacity and memory.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (effective scale alpha/r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA path.")
    lean_lora_dropout: bool = _f(True, "LoRA dropout applied inside lora_A, which keeps its input and a seed for "
                                       "the backward pass instead of a dropped copy per layer (the same dropout, "
                                       "less memory); false: PEFT's dropout. Single process or DDP; under FSDP "
                                       "and DeepSpeed PEFT's dropout is used.")
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
        if self.vision_lora and self.peft == "none":
            raise ValueError("--vision_lora adds LoRA to the vision encoder, and --peft none trains every weight "
                             "anyway: drop it, or choose --peft lora or qlora")
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
        if split is not None and not math.isfinite(split):
            raise ValueError(f"--eval_split {self.eval_split}: a fraction below 1, a row count, a dataset path, or "
                             "none")
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

