"""``stagereason export``: merge a train run's adapter into full-precision weights anyone can load.

setup (read the run dir) -> run (reload the base unquantized, apply the
adapter, merge, verify the logits) -> save (sharded safetensors, processor,
generation config, model card), all inside a temporary directory renamed into
place only when complete. Never merges into a 4-bit model.

Memory: the base is loaded once in the export dtype (Llama-3.2-11B-Vision in
bf16 needs about 22 GB of RAM, fp32 about 44 GB), the adapter adds little, and
the merge happens in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

import torch

__all__ = ["ExportConfig", "run_export", "TOLERANCE"]

logger = logging.getLogger(__name__)
# max |logit difference| allowed, relative to the largest |logit| (and at least this much absolute)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}  # bf16 keeps 8 mantissa bits


def _f(default, help):  # noqa: A002 - argparse's word
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ExportConfig:
    """Options of ``stagereason export``."""

    adapter: str = _f(None, "The train run dir (a LoRA/QLoRA adapter, or a full fine-tune).")
    out: str = _f(None, "Directory for the merged model.")
    dtype: Literal["bf16", "fp16", "fp32"] = _f("bf16", "Precision of the exported weights.")
    base: str | None = _f(None, "Base model (default: the one the run dir records).")
    force: bool = _f(False, "Replace an existing non-empty --out.")
    max_shard_size: str = _f("5GB", "Largest safetensors shard.")
    json: bool = _f(False, "Print the summary as one JSON object.")

    def __post_init__(self):
        if not self.adapter or not self.out:
            raise ValueError("--adapter RUN_DIR and --out DIR are required")
        from transformers.utils.hub import convert_file_size_to_int

        try:  # checked now, not once the model has merged
            if convert_file_size_to_int(self.max_shard_size) <= 0:
                raise ValueError("not above 0")
        except (TypeError, ValueError) as err:
            raise ValueError(f"--max_shard_size {self.max_shard_size!r}: a size such as 5GB, 500MB or 200KB "
                             f"({err})") from None


def _run_info(run: Path) -> dict:
    from stagereason.modeling import recorded_base

    info = json.loads((run / "run_info.json").read_text()) if (run / "run_info.json").is_file() else {}
    if (run / "adapter_config.json").is_file():
        info["base_model"] = info.get("base_model") or recorded_base(run)
        info["kind"] = "adapter"
    elif (run / "config.json").is_file():
        if not info:  # a model dir, not a train run's: exporting it would label a model that was never trained here
            raise ValueError(f"{run} is a model dir, not a stagereason train run dir (no run_info.json): export "
                             "takes the --output_dir of `stagereason train`")
        info["kind"] = "full"
    else:
        raise FileNotFoundError(f"{run} is neither an adapter run dir (adapter_config.json) nor a model dir "
                                "(config.json)")
    return info


def _probe(processor, device):
    """A fixed probe: a drawn image and a question, as the model's chat template lays them out."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse([20, 20, 70, 70], fill=(220, 40, 40))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "<SUMMARY> I will look at the circle."}]}])
    return processor(images=[[img]], text=[text], add_special_tokens=False, return_tensors="pt").to(device)


@torch.no_grad()
def _logits(model, inputs, dtype):
    batch = dict(inputs)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return model(**batch).logits.float()


def _card(info: dict, run: Path, cfg: ExportConfig, max_diff: float) -> str:
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    ev = summary.get("eval") or {}
    return f"""---
base_model: {info.get('base_model')}
library_name: transformers
pipeline_tag: image-text-to-text
tags: [stagereason, llava-cot, staged-reasoning]
---
# {Path(cfg.out).name}

A vision-language model fine-tuned with stagereason to answer in four stages:

```text
<SUMMARY> how it will approach the problem </SUMMARY>
<CAPTION> what in the image matters for the question </CAPTION>
<REASONING> step-by-step logic </REASONING>
<CONCLUSION> the final answer </CONCLUSION>
```

- Base model: `{info.get('base_model')}`
- Training data: `{info.get('dataset')}`
- Fine-tuning: {info.get('peft', 'unknown')} (quantization during training: {info.get('quantization')}),
  steps {summary.get('steps')}, final train loss {summary.get('final_train_loss')}
- Held-out stage-aware eval at the end of training: format rate {ev.get('format_rate')}, accuracy {ev.get('accuracy')}
- Exported weights: {cfg.dtype}, {'adapter merged into the unquantized base' if info['kind'] == 'adapter'
                                  else 'full fine-tune converted'};
  logits checked against the unmerged model on a probe image: max abs difference {max_diff:.3g}

## Use with transformers

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("{cfg.out}")
processor = AutoProcessor.from_pretrained("{cfg.out}")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "How many red objects?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=1024)[0]))
```

## Use with stagereason (stage-level beam search)

```python
from stagereason import Reasoner
r = Reasoner.from_pretrained("{cfg.out}")
print(r.answer("scene.png", "How many red objects?", search="stage", beam_size=4).trace.render())
```
"""


def run_export(cfg: ExportConfig) -> dict:
    """Merge (or convert), verify, and save atomically; returns the summary."""
    from transformers import AutoModelForImageTextToText

    from stagereason.console import report
    from stagereason.data_gen.records import atomic_write_text
    from stagereason.fsio import atomic_dir, check_out_dir, inputs_inside
    from stagereason.modeling import _load_adapter, load_processor, resolve_dtype

    run = Path(cfg.adapter)
    if not run.is_dir():
        raise FileNotFoundError(f"run dir {run} does not exist")
    info = _run_info(run)
    base = cfg.base or info.get("base_model")
    inside = inputs_inside(cfg.out, [("--adapter", cfg.adapter), ("--base" if cfg.base else "the base model", base)])
    if inside:
        raise FileExistsError(f"--out {cfg.out} would replace this export's input ({', '.join(inside)}); choose "
                              "another --out")
    check_out_dir(cfg.out, cfg.force)  # refuse before any heavy work
    if info["kind"] == "adapter" and not base:
        raise ValueError(f"{run} does not record its base model; pass --base")
    dtype = resolve_dtype(cfg.dtype)
    processor = load_processor(run, info.get("model_type"))  # an adapter run dir holds no model config
    with atomic_dir(cfg.out, force=cfg.force) as tmp:
        if info["kind"] == "adapter":
            try:
                model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)  # unquantized, always
            except OSError as err:
                raise FileNotFoundError(f"{run} is an adapter on base model {base}, which cannot be loaded "
                                        f"({type(err).__name__}: {str(err).splitlines()[0]}); pass the base as "
                                        "--base") from None
            model = _load_adapter(model, run, base).eval()  # names a base/adapter mismatch
            inputs = _probe(processor, model.device)
            reference = _logits(model, inputs, dtype)
            model = model.merge_and_unload()
        else:
            source = AutoModelForImageTextToText.from_pretrained(run, dtype=torch.float32).eval()
            inputs = _probe(processor, source.device)
            reference = _logits(source, inputs, torch.float32)
            model = source.to(dtype)  # converted in place: the weights are read from disk once
        merged = _logits(model, inputs, dtype)
        max_diff = (merged - reference).abs().max().item()
        allowed = TOLERANCE[cfg.dtype] * max(1.0, reference.abs().max().item())
        if not max_diff <= allowed:
            raise ValueError(f"verification failed: merged logits differ from the unmerged model by {max_diff:.4g} "
                             f"(allowed {allowed:.4g} in {cfg.dtype}); nothing was written to {cfg.out}")
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(info, run, cfg, max_diff), encoding="utf-8")
        export_info = {"source_run": str(run.resolve()), "base_model": base, "kind": info["kind"],
                       "dtype": cfg.dtype, "max_abs_logit_diff": max_diff, "allowed": allowed}
        atomic_write_text(tmp / "export_info.json", json.dumps(export_info, indent=2) + "\n")
    files = sorted(p.name for p in Path(cfg.out).iterdir())
    summary = {"out": cfg.out, "base_model": base, "kind": info["kind"], "dtype": cfg.dtype,
               "max_abs_logit_diff": max_diff, "allowed": allowed, "files": len(files)}
    report(f"exported: {cfg.out}", summary, cfg.json)
    return summary
