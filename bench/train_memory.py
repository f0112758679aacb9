"""Peak memory of one QLoRA training step: PEFT's LoRA dropout, `train`'s lean dropout, and no dropout, side by side.

The model is a slice of the real Llama-3.2-11B-Vision architecture, built in
code with random bf16 weights (nothing downloaded): its widths and vocabulary,
``--text_layers`` text layers (cross-attention at 3, as in the real model) and
a vision tower of 5 local layers (the real one's 5 intermediate outputs) and 1
global layer. Each variant runs ``stagereason train`` with the QLoRA recipe
(nf4, double quantization, LoRA r=16 on the text decoder including
cross-attention, non-reentrant checkpointing, bf16 compute: autocast on the CPU
too, as on a GPU) on rows of ``--seq`` tokens with a 4-tile image, batch 2. The
second step is measured: the peak of what is allocated during the step above
what was allocated at its start (weights, LoRA weights, optimizer states). On
a GPU from the CUDA allocator's statistics; on the CPU every storage an
operator makes is recorded (a dispatch mode) and the record replayed to its
peak, which lists the code holding the most memory then (``--sites N``).

On the CPU, TRL scores the LM head in torch tiles of up to 4096 x 32768
logits (on a GPU a Triton kernel folds them); the bench narrows them to
512 x 4096 so that the step's peak is the decoder's, as on a GPU.

    python bench/train_memory.py [--seq 2048 --text_layers 4] [--variants peft,lean,none] [--sites 8] [--json]
    python bench/train_memory.py --arch test --seq 256 --max_image_tiles 2   # the tiny `test` model: seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_11b  # noqa: E402 - bench/gpu_11b.py

from stagereason.console import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"peft": ["--lean_lora_dropout", "false"], "lean": ["--lean_lora_dropout", "true"],
            "none": ["--lora_dropout", "0"]}
TORCH_DIR = str(Path(torch.__file__).parent) + "/"


def build(out: Path, arch: str, text_layers: int) -> dict:
    """Save the slice of the 11B architecture (or the tiny ``test`` model) with its processor to ``out``."""
    if arch == "test":
        gpu_11b.build(out, "test")
        return {"arch": "test"}
    built = gpu_11b.build(out, "llama32v-11b", text_layers=text_layers)
    cross = json.loads((out / "config.json").read_text())["text_config"]["cross_attention_layers"]
    return {"arch": f"llama32v-11b, {text_layers} text layers (cross-attention at {cross}), 5+1 vision layers",
            "parameters": built["parameters"]}


def _frame(op: str) -> dict:
    """The innermost Python frame outside torch and this file (the model, PEFT or TRL line that allocated), in
    the form of a CUDA allocation trace's frames, the operator named with the function."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return {"filename": "(autograd's backward engine)", "line": 0, "name": f"[{op}]"}
    return {"filename": frame.f_code.co_filename, "line": frame.f_lineno, "name": f"{frame.f_code.co_name} [{op}]"}


class StorageRecord(TorchDispatchMode):
    """Every CPU storage an operator allocates while active (not views, not in-place results), and its freeing:
    an ordered record in the form of the CUDA allocator's trace, which :func:`gpu_11b.peak_sites` replays to the
    peak and what was held then (with ``sites``, each allocation's code; else none)."""

    def __init__(self, sites: bool):
        super().__init__()
        self.sites, self.live, self.events, self.n = sites, set(), [], 0

    def _freed(self, key: int, size: int) -> None:
        if key in self.live:
            self.live.discard(key)
            self.events.append({"action": "free_completed", "addr": key, "size": size})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        frames = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            size, ptr = storage.nbytes(), storage.data_ptr()
            if size == 0 or ptr in inputs:  # a view or in-place result: nothing new
                continue
            inputs.add(ptr)  # an operator's outputs sharing a storage count once
            if frames is None:
                frames = [_frame(func.__name__)] if self.sites else []
            self.n += 1  # a key of its own: a freed address is soon reused
            self.live.add(self.n)
            self.events.append({"action": "alloc", "addr": self.n, "size": size, "frames": frames})
            weakref.finalize(storage, self._freed, self.n, size)
        return out


def measure(model_dir: Path, seq: int, variant: str, sites: int, overrides: list[str]) -> dict:
    """One variant: ``stagereason train`` for 2 steps, the second measured."""
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils
    from transformers import AutoProcessor, TrainerCallback

    from stagereason.config import parse_config
    from stagereason.train import runner

    if not torch.cuda.is_available():  # TRL's torch path of the LM head: tiles as small as a GPU's peak needs
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, chunked.TOKEN_CHUNK_SIZE = 4096, 512

    class Measure(TrainerCallback):
        def __init__(self):
            self.step, self.record, self.result = 0, None, {}

        def on_step_begin(self, args, state, control, **kwargs):
            self.step += 1
            if self.step != 2:
                return
            self.t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                self.record = StorageRecord(sites > 0)
                self.record.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.step != 2:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.result = {"peak_bytes": torch.cuda.max_memory_allocated() - self.start}
            else:
                self.record.__exit__(None, None, None)
                peak = gpu_11b.peak_sites(self.record.events, 0, sites)
                self.result = {"peak_bytes": peak["peak_allocated_bytes"]}
                if sites:
                    self.result["sites"] = peak["sites"]
            self.result["step_s"] = round(time.perf_counter() - self.t0, 1)

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        row_tokens = gpu_11b._rows(AutoProcessor.from_pretrained(model_dir), seq, 4, data)
        (cfg,) = parse_config((runner.TrainConfig,), [
            "--config", str(ROOT / "train/llama32v-11b-qlora.yaml"), "--model_name_or_path", str(model_dir),
            "--dataset", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "2", "--max_length", str(seq),
            "--eval_split", "none", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
            "--report_to", "none", "--stage_eval_samples", "0", "--dataloader_num_workers", "0",
            "--optim", "adamw_torch", *VARIANTS[variant], *overrides])
        cfg.bf16 = True  # bf16 compute as on a GPU (`train` itself runs fp32 on the CPU)
        setup = runner.build_trainer(cfg)
        probe = Measure()
        setup.trainer.add_callback(probe)
        setup.trainer.train()
        fused = setup.trainer.lora_dropout_fused
        del setup
    return {"row_tokens": row_tokens, "lean_layers": fused, **probe.result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama32v-11b-slice", choices=("llama32v-11b-slice", "test"))
    p.add_argument("--text_layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--variants", default="peft,lean,none",
                   help="peft: PEFT's dropout; lean: train's (the default); none: --lora_dropout 0")
    p.add_argument("--sites", type=int, default=0, metavar="N", help="on the CPU: the N code sites holding the most "
                                                                     "at each variant's peak")
    p.add_argument("--json", action="store_true")
    args, overrides = p.parse_known_args()  # more `stagereason train` flags for every variant
    variants = args.variants.split(",")
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants {args.variants}: a comma-separated list of {', '.join(VARIANTS)}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        result = build(Path(tmp) / "model", args.arch, args.text_layers)
        result.update({"seq": args.seq, "batch": 2, "measured": "cuda allocator" if torch.cuda.is_available()
                       else "cpu storages allocated by operators"})
        for v in variants:
            r = measure(Path(tmp) / "model", args.seq, v, args.sites, overrides)
            result["row_tokens"] = r.pop("row_tokens")
            result[f"{v}_step_peak_gb"] = round(r["peak_bytes"] / 2**30, 3)
            result[f"{v}_step_peak_bytes"] = r.pop("peak_bytes")
            result[f"{v}_step_s"] = r.pop("step_s")
            result[f"{v}_layers_with_lean_dropout"] = r.pop("lean_layers")
            if "sites" in r:
                result[f"{v}_sites"] = r["sites"]
    if "peft" in variants:
        for v in variants:
            if v != "peft":
                result[f"{v}_over_peft"] = round(result[f"{v}_step_peak_bytes"] / result["peft_step_peak_bytes"], 3)
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report("bench/train_memory.py", result, args.json)


if __name__ == "__main__":
    main()
