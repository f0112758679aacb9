"""``stagereason train``: TRL SFT of a VLM on staged traces — QLoRA (default), LoRA or full fine-tuning.

setup (validate data, lengths, model, trainer) -> run (``trainer.train``,
resumable) -> save (weights, processor, resolved config, run info,
``train_summary.json``, ``loss.png``). The options are in ``config.py``, the
trainer and its callbacks in ``trainer.py``, the run directory in ``rundir.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np

from stagereason.modeling import special_token_in_messages, structural_special_tokens
from stagereason.train.config import TrainConfig
from stagereason.train.data import Row, load_rows, open_image, split_rows, to_dataset
from stagereason.train.rundir import (
    PreviousRun,
    _checkpoint_step,
    _last_evaluation_is_stale,
    _prepare_output_dir,
    _save,
    check_images_outside,
    finished_run,
    run_info,
)
from stagereason.train.trainer import StageSFTTrainer, _StopOnSignal, text_only_guesser

__all__ = ["TrainConfig", "TrainSetup", "build_trainer", "run_train", "StageSFTTrainer"]

logger = logging.getLogger(__name__)


def _token_lengths(rows: list[Row], processor, template: str, report, skip_invalid: bool) -> list[Row]:
    """Count each row's tokens; rows the chat template refuses, or whose text holds a special token, are named (or
    dropped, counted, with --skip_invalid).

    Returns the rows the template renders.
    """
    from jinja2 import TemplateError

    tok = processor.tokenizer
    specials = structural_special_tokens(processor, template)
    texts, kept, refused = [], [], []
    for r in rows:
        problem = special_token_in_messages(r.messages, specials)
        if problem:
            refused.append(r)
            report.add(r.id, "special token", problem)
            continue
        try:
            texts.append(processor.apply_chat_template(r.messages, tokenize=False, chat_template=template))
            kept.append(r)
        except TemplateError as err:  # e.g. Llama-3.2-Vision's: "Prompting with images is incompatible with system
            refused.append(r)         # messages."
            report.add(r.id, "chat template", str(err))
    if refused and not skip_invalid:
        shown = "; ".join(f"row {r.id}: {report.problems[r.id][-1]}" for r in refused[:5])
        raise ValueError(f"{len(refused)} row(s) of the dataset cannot be given to the model: {shown}"
                         f"{' ...' if len(refused) > 5 else ''}; pass --skip_invalid to drop them")
    if refused:
        logger.warning("dropped %d row(s) the chat template refuses or whose text holds a special token "
                       "(--skip_invalid)", len(refused))
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


def _eos_ids(model) -> tuple[int, ...]:
    """The tokens that end a generated turn, from the model's generation config."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _load(cfg: TrainConfig, processor, base: str | None = None, config=None):
    from stagereason.modeling import load_model, vision_tower

    quant = "4bit" if cfg.peft == "qlora" else None
    model, processor = load_model(base or cfg.model_name_or_path, quantization=quant,
                                  attn_implementation=cfg.attn_implementation,
                                  dtype="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32", processor=processor,
                                  config=config)
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
    previous: PreviousRun | None = None  # the old contents of output_dir, set aside until the first step trains
    finished: dict | None = None  # resuming a run that has reached its last step: its summary


def _check_tiles(cfg: TrainConfig, model_config) -> None:
    """``--max_image_tiles`` is for a model that cuts images into tiles, and within its count."""
    most = getattr(getattr(model_config, "vision_config", None), "max_num_tiles", None)
    if cfg.max_image_tiles is not None and most is None:
        raise ValueError(f"--max_image_tiles: {cfg.model_name_or_path} does not cut images into tiles; cap image "
                         "size with --max_image_side instead")
    if cfg.max_image_tiles is not None and not 1 <= cfg.max_image_tiles <= most:
        raise ValueError(f"--max_image_tiles {cfg.max_image_tiles}: {cfg.model_name_or_path} takes 1 to {most} "
                         "tiles per image")


def _training_template(cfg: TrainConfig, processor, model_type: str, base: str) -> str:
    """:func:`training_chat_template`; a tiny model of an earlier stagereason, whose template fixed the date, is
    named as such."""
    from stagereason.train.templates import training_chat_template

    try:
        return training_chat_template(processor, model_type, cfg.chat_template_path)
    except ValueError as err:
        dated = "render a question without an image" in str(err)  # the header that holds the date
        if dated and cfg.chat_template_path is None and (Path(base) / "stagereason_tiny.json").is_file():
            raise ValueError(f"{err}\n{cfg.model_name_or_path} is a tiny model built by an earlier stagereason, "
                             "whose template fixed the date: build it again (stagereason tiny-model "
                             f"{cfg.model_name_or_path} --force)") from err
        raise


def build_trainer(cfg: TrainConfig) -> TrainSetup:
    """Validate the data, drop over-long rows, load the model and build the trainer (``trainer`` is None on dry runs).

    Everything that can fail on the data fails before the model is loaded.
    """
    from stagereason.fsio import local_or_name
    from stagereason.modeling import load_processor
    from stagereason.modeling import model_config as read_model_config
    from stagereason.train.collate import StageCollator

    resume, clear = _prepare_output_dir(cfg)
    base = local_or_name(cfg.model_name_or_path)  # recorded in the adapter: the run dir loads from anywhere
    model_config = read_model_config(base, "--model_name_or_path")  # a bad name fails before the data is read
    rows, rep, source = load_rows(cfg.dataset, cfg.image_root, skip_invalid=cfg.skip_invalid)
    train_rows, eval_rows = split_rows(rows, cfg.eval_split, cfg.seed, cfg.eval_image_root or cfg.image_root, source,
                                       skip_invalid=cfg.skip_invalid)
    if clear:
        check_images_outside(Path(cfg.output_dir), train_rows + eval_rows)
    _check_tiles(cfg, model_config)
    processor = load_processor(base, model_config.model_type)
    template = _training_template(cfg, processor, model_config.model_type, base)
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
    strategy = str(getattr(cfg.eval_strategy, "value", cfg.eval_strategy))
    if not eval_kept and (strategy != "no" or cfg.load_best_model_at_end):
        why = "--eval_split is none" if not eval_rows else f"all {len(eval_rows)} are longer than --max_length"
        raise ValueError(f"--eval_strategy {strategy} needs held-out rows, and there are none ({why}): set "
                         "--eval_split, or --eval_strategy no")
    if cfg.dry_run:
        return TrainSetup(None, processor, {}, data, resume)
    done = finished_run(Path(cfg.output_dir), resume, data["estimated_steps"])
    if done is not None:  # nothing to train: the run is there, whole
        return TrainSetup(None, processor, {}, data, resume, finished=done)
    if not kept:
        raise ValueError(f"no training rows left in {cfg.dataset} (invalid: {len(rep.problems)}, "
                         f"longer than max_length {cfg.max_length}: {data['too_long_dropped']})")
    if data["too_long_dropped"]:
        logger.warning("dropped %d rows longer than max_length=%d tokens (never truncated through the image)",
                       data["too_long_dropped"], cfg.max_length)
    model, processor = _load(cfg, processor, base, model_config)  # the processor and config read above
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
    previous = None
    if clear:  # data, model and trainer are in hand: only now does the previous run move aside, by one process
        previous = PreviousRun(Path(cfg.output_dir))
        trainer.add_callback(previous)
        with cfg.main_process_first(desc="setting the previous run aside"):
            if cfg.process_index == 0:
                previous.set_aside()
    info = run_info(cfg, model_config.model_type, model, trainer, resume)
    return TrainSetup(trainer, processor, info, data, resume, previous)


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
    if setup.finished is not None:
        if cfg.process_index == 0:
            print(f"nothing to do: {cfg.output_dir} holds this run, finished at step {setup.finished['steps']} "
                  "(raise --max_steps or --num_train_epochs to train on)", file=sys.stderr)
            if cfg.json:
                report("", setup.finished, as_json=True)
        return setup.finished
    trainer = setup.trainer
    first_step = _checkpoint_step(setup.resume)
    start = time.perf_counter()
    stop = _StopOnSignal()
    trainer.add_callback(stop)
    previous = setup.previous if trainer.is_world_process_zero() else None  # the process that set it aside
    if previous is not None:
        previous.keep = lambda: stop.received is not None  # a stop at the first step puts it back
    stop.install()
    try:
        out = trainer.train(resume_from_checkpoint=setup.resume)
    except BaseException:
        if previous is not None:
            previous.restore("failed")
        raise
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
        stopped = {"stopped_by": name, "steps": stop.stopped_at, "checkpoint": str(ckpt),
                   "exit_status": 128 + (stop.received or signal.SIGTERM)}
        if previous is not None and previous.restore(f"was stopped by {name}"):
            print(f"stopped by {name} at step {stop.stopped_at}, before the run was under way: {cfg.output_dir} holds "
                  "the previous run again; run the command again to replace it", file=sys.stderr)
            stopped["checkpoint"] = None
        elif trainer.is_world_process_zero():
            print(f"stopped by {name} at step {stop.stopped_at} of {trainer.state.max_steps}: saved {ckpt}; the same "
                  "command with --resume_from_checkpoint auto goes on from there", file=sys.stderr)
        if cfg.json and trainer.is_world_process_zero():
            report("", stopped, as_json=True)
        return stopped
    if previous is not None:
        previous.drop()  # kept by a signal at the last step, which ends the run as usual
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
    shown.update({f"rows {k}": v for k in ("invalid_dropped", "too_long_dropped") if (v := summary["dataset"][k])})
    report(f"trained: {cfg.output_dir}", summary if cfg.json else shown, cfg.json)  # --json: the whole summary
    return summary
