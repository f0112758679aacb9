"""The run directory of ``stagereason train``: refuse or clear an old one, find and check checkpoints, and write
the self-describing files (weights, processor, resolved config, run info, summary, loss curve)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from stagereason.fsio import inputs_inside, local_or_name
from stagereason.train.config import TrainConfig
from stagereason.train.trainer import StageSFTTrainer

logger = logging.getLogger(__name__)


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
    for aside in set_aside_runs(out):
        logger.warning("%s holds what an earlier --overwrite_output_dir run of %s set aside; it was stopped before "
                       "its first step had trained: move it back or remove it", aside, out)
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
        inside = inputs_inside(out, [(f"--{name}", value) for name, value in _input_paths(cfg)])
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
                                       "eval_image_root", "chat_template_path")
            if isinstance(value := getattr(cfg, name), str) and value]


def check_images_outside(out: Path, rows) -> None:
    """Refuse to replace an output dir that holds images of the rows (they would be gone before training)."""
    inside = inputs_inside(out, [(f"row {r.id}: image", ref) for r in rows for ref in r.images
                                 if isinstance(ref, str)])
    if inside:
        raise FileExistsError(f"--overwrite_output_dir would delete {out}, which holds {len(inside)} image(s) of "
                              f"this run's rows ({inside[0]}{', ...' if len(inside) > 1 else ''}); choose another "
                              "--output_dir")


_ASIDE_PREFIX = ".{name}.previous-"  # the hidden folder beside an output dir that holds its previous contents


class PreviousRun(TrainerCallback):
    """The old contents of an output dir that ``--overwrite_output_dir`` replaces: renamed aside (a hidden folder
    beside it) when the new run is ready, removed once its first step has trained, put back if the run fails or is
    stopped by a signal before. Only the main process moves files. A run killed before its first step leaves them
    in the hidden folder, which the next run in that output dir names (:func:`_prepare_output_dir`).

    An output dir that is a symbolic link stays one: the folder it points to is set aside and made anew.
    """

    def __init__(self, out: Path):
        self.out = Path(os.path.realpath(out))
        self.aside: Path | None = None
        self.keep = lambda: False  # True while the previous contents must stay (a stop was asked for)

    def set_aside(self) -> None:
        for n in range(1000):
            aside = self.out.parent / f"{_ASIDE_PREFIX.format(name=self.out.name)}{os.getpid()}{f'-{n}' if n else ''}"
            if not os.path.lexists(aside):
                break
        self.out.rename(aside)
        self.out.mkdir()  # where a link points, and where the trainer writes
        self.aside = aside
        logger.warning("--overwrite_output_dir: the previous contents of %s are set aside in %s and removed once "
                       "the first step has trained", self.out, aside)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.keep():
            self.drop()

    def drop(self) -> None:
        """Remove the previous contents (the new run is under way)."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def restore(self, why: str) -> bool:
        """Put the previous contents back: the new run ``why`` (failed, or was stopped) before its first step had
        trained. Returns whether they are back."""
        if self.aside is None or not self.aside.is_dir():
            return False
        try:
            if self.out.exists():
                shutil.rmtree(self.out)  # only what this run wrote: its inputs were checked to lie outside
            self.aside.rename(self.out)
        except OSError as err:  # never hide why the run ended; say where the old contents are
            logger.error("the previous contents of %s could not be put back (%s): they are in %s", self.out, err,
                         self.aside)
            return False
        logger.warning("the run %s before its first step had trained: %s holds its previous contents again", why,
                       self.out)
        self.aside = None
        return True


def set_aside_runs(out: Path) -> list[Path]:
    """Hidden folders beside ``out`` holding what an ``--overwrite_output_dir`` run killed before its first step
    had set aside."""
    real = Path(os.path.realpath(out))
    return sorted(p for p in real.parent.glob(_ASIDE_PREFIX.format(name=real.name) + "*") if p.is_dir())


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


def run_info(cfg: TrainConfig, model_type: str, model, trainer: StageSFTTrainer, resume: str | None) -> dict:
    """What ``run_info.json`` records: base model, what trained and how, library versions, processes."""
    return {"base_model": local_or_name(cfg.model_name_or_path), "model_type": model_type, "peft": cfg.peft,
            "quantization": "4bit-nf4" if cfg.peft == "qlora" else None,
            "lean_lora_dropout_layers": trainer.lora_dropout_fused,
            "precision": "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32",
            "attention": model.config._attn_implementation, "dataset": local_or_name(cfg.dataset),
            "versions": _versions(), "git_revision": _git_revision(), "resumed_from": resume,
            "processes": cfg.world_size, "distributed": str(trainer.accelerator.distributed_type.value)}


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


def _summary(cfg: TrainConfig, trainer: StageSFTTrainer, summary_data: dict, runtime: float,
             first_step: int) -> dict:
    """What ``train_summary.json`` holds: steps, losses, this run's rates and peak memory, the last evaluation."""
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
    return summary


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
    summary = _summary(cfg, trainer, summary_data, runtime, first_step)
    if not trainer.args.should_save:
        return summary
    processor.save_pretrained(str(out))
    dump_config((cfg,), out / "train_config.yaml", paths=(*(name for name, _ in _input_paths(cfg)), "output_dir"))
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "run_info.json", json.dumps(info, indent=2) + "\n")
    if trainer.stage_samples:
        atomic_write_text(out / "eval_samples.jsonl",
                          "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in trainer.stage_samples))
    if trainer.state.log_history:
        _plot_loss(trainer.state.log_history, out / "loss.png")
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


def _checkpoint_step(ckpt: str | None) -> int:
    if not ckpt:
        return 0
    try:
        return int(json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("global_step", 0))
    except (OSError, ValueError):
        return 0


def finished_run(out: Path, resume: str | None, last_step: int) -> dict | None:
    """The summary of the finished run in ``out`` when the checkpoint to resume from is at or past the run's last
    step (transformers would train one step more, past ``--max_steps``, and rewrite the run); else None.

    Raises:
        ValueError: that checkpoint is the last step's, and the run dir has no summary (stopped while saving).
    """
    step = _checkpoint_step(resume)
    if not resume or step < last_step:
        return None
    try:
        summary = json.loads((out / "train_summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or summary.get("steps", -1) < step:
        raise ValueError(f"--resume_from_checkpoint {resume} is at step {step}, at or past the {last_step} steps "
                         f"this run's settings give, and {out} has no train_summary.json of a finished run (one that "
                         "stopped while saving, or settings that changed): its weights are in that checkpoint; to "
                         "train more, raise --max_steps or --num_train_epochs")
    return summary


def _last_evaluation_is_stale(trainer) -> bool:
    """No evaluation has seen the weights the run ends with: none ran, the last one ran before the final step, or
    the best checkpoint (``--load_best_model_at_end``) was loaded back over later weights."""
    state = trainer.state
    evals = [h["step"] for h in state.log_history if "eval_loss" in h]
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    return not evals or evals[-1] != state.global_step or (best is not None and _checkpoint_step(best) !=
                                                           state.global_step)


