"""The real Llama-3.2-11B-Vision architecture with random weights: QLoRA training and stage beam search on a GPU.

Nothing is downloaded. `build` makes the exact 11B configuration (40 text
layers with cross-attention at 3, 8, ..., 38; the 32+8-layer 560px vision
tower; vocabulary 128256 with <|image|> = 128256) with random bf16 weights on
the GPU and saves it with a processor whose tokenizer (trained in code) has
Llama-3's special-token ids. `train` runs `stagereason train` on it with
QLoRA (nf4, LoRA r=16 on the text decoder incl. cross-attention) on rows of
exactly the requested token length with a 4-tile image each, and reports peak
reserved GPU memory (split by phase of the step; with --memory_trace, the code
holding it at the peak) and steady-state tokens/s. `infer` times stage beam search
at N=2 and N=4 against plain greedy decoding of the same number of tokens.

    python bench/gpu_11b.py build runs/llama32v-11b-random
    python bench/gpu_11b.py train runs/llama32v-11b-random [--seq 2048 --batch 2 --lora_r 16] [--json] \
        [--memory_trace 12] [--recipe train/llama32v-11b-qlora.yaml] [any `stagereason train` flag, e.g. \
        --optim paged_adamw_8bit]
    python bench/gpu_11b.py infer runs/llama32v-11b-random [--max_stage_tokens 64] [--json]

`--arch test` (with `build`) makes the tiny `test` architecture instead, to
check the code path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from stagereason.console import report

TRACE = ("<SUMMARY> I will count the objects and read the chart. </SUMMARY>\n\n"
         "<CAPTION> A chart with bars and a few shapes. </CAPTION>\n\n"
         "<REASONING> {reasoning} </REASONING>\n\n<CONCLUSION> 3 </CONCLUSION>")
TRACE_ENTRIES = 2_000_000  # allocation history kept for the traced step; more and the oldest are overwritten
FILLER = "The red circle is left of the blue square, so I count it once more. "


def llama32v_11b_config(tokenizer):
    """The configuration of Llama-3.2-11B-Vision(-Instruct), ids read from ``tokenizer``."""
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = MllamaVisionConfig(
        hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16, intermediate_size=5120,
        vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4, norm_eps=1e-5,
        intermediate_layers_indices=[3, 7, 15, 23, 30],
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    )
    text = MllamaTextConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=ids("<|begin_of_text|>"), pad_token_id=ids("<|finetune_right_pad_id|>"),
        eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=ids("<|image|>"))


def sliced(config, text_layers: int):
    """``config`` cut to its first ``text_layers`` text layers (its cross-attention layers among them) and a
    vision tower of 5 local layers (the real one's 5 intermediate outputs) and 1 global layer; widths and
    vocabulary kept."""
    config.text_config.num_hidden_layers = text_layers
    config.text_config.cross_attention_layers = [i for i in config.text_config.cross_attention_layers
                                                 if i < text_layers]
    config.vision_config.num_hidden_layers, config.vision_config.num_global_layers = 5, 1
    config.vision_config.intermediate_layers_indices = [0, 1, 2, 3, 4]
    return config


def build(out: Path, arch: str, text_layers: int | None = None) -> dict:
    """Save a random model of ``arch`` ("llama32v-11b" or "test") with its processor to ``out``; with
    ``text_layers``, the 11B architecture :func:`sliced` to that many."""
    from transformers import GenerationConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from stagereason.tiny import CHAT_TEMPLATE, PRESETS, _build_tokenizer, build_tiny_model, open_gates

    if arch == "test":
        build_tiny_model(out, preset="test", seed=0)
        return {"arch": arch, "out": str(out)}
    t0 = time.perf_counter()
    tokenizer = _build_tokenizer(PRESETS["demo"], seed=0, llama3_ids=True)
    config = llama32v_11b_config(tokenizer)
    if text_layers is not None:
        config = sliced(config, text_layers)
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    open_gates(model)
    model.generation_config = GenerationConfig(bos_token_id=config.text_config.bos_token_id,
                                               eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id, do_sample=False)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t0
    model.save_pretrained(out, max_shard_size="5GB")
    processor.save_pretrained(out)
    return {"arch": arch, "out": str(out), "parameters": params, "build_s": round(built, 1),
            "save_s": round(time.perf_counter() - t0 - built, 1)}


def _rows(processor, seq: int, n: int, data: Path) -> int:
    """Write ``n`` rows of exactly ``seq`` tokens or just under (chat template included) with a 4-tile image."""
    from PIL import Image

    from stagereason.train.templates import training_chat_template

    (data / "images").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    side = 2 * processor.image_processor.size["height"]  # 2x2 tiles: the most an 11B image gets
    pixels = torch.randint(0, 256, (side, side, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(data / "images" / "noise.png")
    template = training_chat_template(processor, "mllama", None)
    question = "How many red objects are in the image?"

    def reasoning(k: int) -> str:  # k words
        words = (FILLER * (k // len(FILLER.split()) + 1)).split()
        return " ".join(words[:k])

    def length(k: int) -> int:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": TRACE.format(reasoning=reasoning(k))}]}]
        text = processor.apply_chat_template(messages, chat_template=template)
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    lo, hi = 0, 1
    while length(hi) <= seq:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest word count whose row fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) <= seq else (lo, mid)
    gpt = TRACE.format(reasoning=reasoning(lo))
    with open(data / "data.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"row{i}", "image": "images/noise.png", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": gpt}]}) + "\n")
    return length(lo)


def _site(frames: list[dict]) -> str:
    """Where an allocation was made: its innermost Python frame outside torch's own package (the model, PEFT,
    bitsandbytes or TRL line that asked for it), else its innermost frame."""
    torch_dir = str(Path(torch.__file__).parent) + "/"
    frame = next((f for f in frames if not f["filename"].startswith(torch_dir)), frames[0] if frames else None)
    if frame is None:
        return "(no Python frame: autograd's backward engine)"
    name = frame["filename"]
    for cut in ("site-packages/", "dist-packages/", str(Path(__file__).resolve().parents[1]) + "/"):
        name = name.split(cut, 1)[-1]
    return f"{name}:{frame['line']} {frame['name']}"


def peak_sites(trace: list[dict], baseline: int, top: int) -> dict:
    """Replay one recorded step: when allocated memory peaked, and which code held it then.

    ``trace`` is the GPU's history from ``torch.cuda.memory._snapshot()`` taken at the step's end, recorded
    from its start, when ``baseline`` bytes were allocated (weights, optimizer states: allocated before, so
    without stacks). The blocks live at the peak are summed by :func:`_site`; the largest ``top`` are listed.
    """
    events = [e for e in trace if e["action"] in ("alloc", "free_completed")]
    level, peak, peak_at = baseline, baseline, -1
    for i, event in enumerate(events):
        level += event["size"] if event["action"] == "alloc" else -event["size"]
        if level > peak:
            peak, peak_at = level, i
    held: dict[int, dict] = {}  # address -> its live allocation, at the peak
    for event in events[:peak_at + 1]:
        if event["action"] == "alloc":
            held[event["addr"]] = event
        else:
            held.pop(event["addr"], None)
    sites: dict[str, list[int]] = {}
    for event in held.values():
        bytes_blocks = sites.setdefault(_site(event.get("frames") or []), [0, 0])
        bytes_blocks[0] += event["size"]
        bytes_blocks[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
    new = sum(e["size"] for e in held.values())
    return {
        "peak_allocated_gb": round(peak / 2**30, 3), "peak_allocated_bytes": peak,
        "allocated_at_step_start_gb": round(baseline / 2**30, 3),
        "of_it_live_at_peak_gb": round((peak - new) / 2**30, 3),
        "allocated_in_step_live_at_peak_gb": round(new / 2**30, 3),
        "sites": [{"site": site, "gb": round(b / 2**30, 3), "blocks": n} for site, (b, n) in ranked[:top]],
        "other_sites_gb": round(sum(b for _, (b, _) in ranked[top:]) / 2**30, 3),
        "events": len(events), "history_full": len(trace) >= TRACE_ENTRIES,
    }


def train(model_dir: Path, seq: int, batch: int, steps: int, warmup: int, lora_r: int, recipe: str,
          overrides: list[str], trace_top: int = 0) -> dict:
    """``stagereason train --config RECIPE`` on ``model_dir``: peak reserved memory and steady-state tokens/s.

    The recipe's settings hold except the model, data, sizes and what makes a
    short measurement (no evaluation, no checkpoints, one row batch per step);
    ``overrides`` (``--key value`` pairs) come last. With ``trace_top`` > 0 (on a
    GPU) one more step, untimed, records every allocation: the ``trace_top`` code
    sites holding the most memory at that step's peak are listed.
    """
    from transformers import AutoProcessor, TrainerCallback

    from stagereason.config import parse_config
    from stagereason.modeling import vision_tower
    from stagereason.train import runner

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    class PhasePeaks(TrainerCallback):
        """Peak allocated GPU memory of each part of a step (the largest over the measured steps): what stays
        between steps (weights, optimizer states), the vision tower's forward, the rest of the forward (text
        decoder and loss), the backward (checkpoint recomputation included), the optimizer step; and what is
        still allocated when the forward ends (what the backward starts from). Where the training peak comes
        from, not only how high it is. Each phase restarts the peak counters, so the run's own peaks
        (``overall``: reserved, allocated) are kept here too. With ``trace_step``, that step's allocations are
        recorded with their Python stacks (``peak_sites`` reads them)."""

        def __init__(self, trace_step: int | None = None):
            self.peaks = {"between_steps": 0.0, "vision": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
            self.live_after_forward = 0.0
            self.overall = [0.0, 0.0]
            self.step = 0
            self.trace_step, self.trace, self.trace_baseline = trace_step, None, 0

        def _measured(self):
            return warmup < self.step <= warmup + steps

        def _restart(self):
            self.overall[0] = max(self.overall[0], torch.cuda.max_memory_reserved() / 2**30)
            self.overall[1] = max(self.overall[1], torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()

        def _mark(self, phase):
            if self._measured():
                self.peaks[phase] = max(self.peaks[phase], torch.cuda.max_memory_allocated() / 2**30)
            self._restart()

        def on_step_begin(self, args, state, control, **kwargs):
            self.step += 1
            if self._measured():
                self.peaks["between_steps"] = max(self.peaks["between_steps"], torch.cuda.memory_allocated() / 2**30)
            self._restart()
            if self.step == self.trace_step:
                self.trace_baseline = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=TRACE_ENTRIES)

        def vision_done(self, module, args, output):
            if setup.trainer.model.training:
                self._mark("vision")

        def forward_done(self, module, args, output):
            if module.training:
                self._mark("forward")
                if self._measured():
                    self.live_after_forward = max(self.live_after_forward, torch.cuda.memory_allocated() / 2**30)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._mark("backward")

        def on_optimizer_step(self, args, state, control, **kwargs):
            self._mark("optimizer")

        def on_step_end(self, args, state, control, **kwargs):
            if self.step == self.trace_step:
                self.trace = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        row_tokens = _rows(AutoProcessor.from_pretrained(model_dir), seq, (steps + warmup) * batch, data)
        (cfg,) = parse_config((runner.TrainConfig,), [
            "--config", recipe, "--model_name_or_path", str(model_dir), "--dataset", str(data),
            "--output_dir", str(out), "--lora_r", str(lora_r), "--lora_alpha", str(2 * lora_r),
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
            "--max_steps", str(steps + warmup + bool(trace_top)), "--max_length", str(seq), "--eval_split", "none",
            "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
            "--stage_eval_samples", "0", "--dataloader_num_workers", "2", *overrides,
        ])
        setup = runner.build_trainer(cfg)
        timer = StepTimer()
        setup.trainer.add_callback(timer)
        weights = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
        phases = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            phases = PhasePeaks(trace_step=warmup + steps + 1 if trace_top else None)
            setup.trainer.add_callback(phases)
            hooks = [setup.trainer.model.register_forward_hook(phases.forward_done)]
            tower = vision_tower(setup.trainer.model)
            if tower is not None:
                hooks.append(tower.register_forward_hook(phases.vision_done))
        t0 = time.perf_counter()
        try:
            setup.trainer.train()
        finally:
            if phases is not None:
                for hook in hooks:
                    hook.remove()
        runtime = time.perf_counter() - t0
        model = setup.trainer.model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lean = setup.trainer.lora_dropout_fused
        history = setup.trainer.state.log_history
    steady = (timer.times[warmup + steps - 1] - timer.times[warmup - 1]) / steps  # a traced step is not timed
    result = {
        "recipe": recipe, "overrides": " ".join(overrides), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "seq_tokens_per_row": row_tokens, "batch": batch,
        "lora_r": lora_r, "optim": cfg.optim, "checkpointing": json.dumps(cfg.gradient_checkpointing_kwargs),
        "measured_steps": steps,
        "s_per_step": round(steady, 3), "tokens_per_s": round(batch * row_tokens / steady, 1),
        "samples_per_s": round(batch / steady, 3), "train_runtime_s": round(runtime, 1),
        "trainable_params": trainable, "lean_lora_dropout_layers": lean,
        "first_loss": next((h["loss"] for h in history if "loss" in h), None),
        "last_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
    }
    if torch.cuda.is_available():
        result.update({"model_loaded_gb": round(weights, 2),
                       "peak_reserved_gb": round(max(phases.overall[0], torch.cuda.max_memory_reserved() / 2**30), 2),
                       "peak_allocated_gb": round(max(phases.overall[1], torch.cuda.max_memory_allocated() / 2**30),
                                                  2),
                       "phase_peak_allocated_gb": {k: round(v, 2) for k, v in phases.peaks.items()},
                       "live_after_forward_gb": round(phases.live_after_forward, 2)})
        if trace_top:
            trace = phases.trace["device_traces"][torch.cuda.current_device()]
            result["traced_step"] = peak_sites(trace, phases.trace_baseline, trace_top)
    return result


def infer(model_dir: Path, max_stage_tokens: int, repeats: int) -> dict:
    """Stage beam search at N=2 and N=4 against plain greedy decoding, bf16 on the GPU."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from infer import best_of_interleaved, plain_greedy  # bench/infer.py
    from stagereason.infer.reasoner import Reasoner
    from stagereason.stages import STAGES

    reasoner = Reasoner.from_pretrained(str(model_dir), max_stage_tokens=max_stage_tokens)
    model, processor = reasoner.model, reasoner.processor
    image = Image.new("RGB", (1120, 1120), "white")  # 4 tiles
    question = "How many red objects are there in the image?"
    runs = {"greedy": lambda: plain_greedy(model, processor, image, question, max_stage_tokens * len(STAGES))}
    for n in (2, 4):
        runs[f"stage_n{n}"] = lambda n=n: reasoner.answer(image, question, search="stage", beam_size=n, judge="self",
                                                          seed=None)
    best_of_interleaved({"warm-up": lambda: plain_greedy(model, processor, image, question, 8)}, 1)
    best = best_of_interleaved(runs, repeats)
    greedy = best["greedy"]
    result = {"max_stage_tokens": max_stage_tokens, "repeats": repeats}
    for n in (2, 4):
        result[f"stage_n{n}_s"] = round(best[f"stage_n{n}"], 3)
        result[f"overhead_vs_greedy_n{n}"] = round(best[f"stage_n{n}"] / greedy, 2)
    result["greedy_s"] = round(greedy, 3)
    result["dtype"] = str(next(model.parameters()).dtype)
    if torch.cuda.is_available():
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("build", "train", "infer"))
    p.add_argument("model_dir", type=Path)
    p.add_argument("--arch", default="llama32v-11b", choices=("llama32v-11b", "test"))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="measured steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--recipe", default="train/llama32v-11b-qlora.yaml")
    p.add_argument("--memory_trace", type=int, default=0, metavar="TOP",
                   help="train on a GPU: record one more step's allocations and list the TOP code sites holding the "
                        "most memory at its peak")
    p.add_argument("--max_stage_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args, overrides = p.parse_known_args()  # unknown flags go to `stagereason train`
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the first step compiles and allocates)")
    if args.repeats < 1 or args.max_stage_tokens < 1:
        p.error("--repeats and --max_stage_tokens must be at least 1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.task == "build":
        result = build(args.model_dir, args.arch)
    elif args.task == "train":
        result = train(args.model_dir, args.seq, args.batch, args.steps, args.warmup, args.lora_r, args.recipe,
                       overrides, trace_top=args.memory_trace)
    else:
        result = infer(args.model_dir, args.max_stage_tokens, args.repeats)
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report(f"bench/gpu_11b.py {args.task}", result, args.json)


if __name__ == "__main__":
    main()
