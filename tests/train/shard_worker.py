"""Run by tests/train/test_distributed.py under ``torchrun --nproc_per_node 2`` on CPU processes (gloo).

Shards a tiny Mllama over the processes with FSDP2 (``fully_shard``, as accelerate does on GPUs) and runs the
stage-evaluation generation on it; writes what it produced beside what the unsharded model produces.
Usage: shard_worker.py MODEL_DIR OUT_JSON N_ITEMS SHARDED(0|1)

``shard_worker.py images OUT_PREFIX IMAGE...`` instead checks the images as training does before the model
loads, and writes per process which images it decoded and which rows it reports.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from stagereason.infer.generate import generate_greedy, generate_greedy_shared
from stagereason.modeling import load_model

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white"]


def item(i: int):
    return [Image.new("RGB", (48 + 8 * i, 40), COLOURS[i % len(COLOURS)])], f"Question {i}: what colour is it?"


def _leave() -> None:
    """Wait for the other process, then exit at once: an interpreter tearing down gloo's threads now and then
    aborts ("terminate called without an active exception") after all the work is done."""
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def check_images(out: str, images: list[str]) -> None:
    from stagereason.data_gen.validate import ValidationReport, _check_all_images

    dist.init_process_group("gloo")
    decoded, report = [], ValidationReport(path="images")

    def load(path):
        decoded.append(path)
        return path

    _check_all_images([(f"row{i}", p) for i, p in enumerate(images)], report, load=load)
    with open(f"{out}{dist.get_rank()}.json", "w") as f:
        json.dump({"decoded": decoded, "problems": sorted(report.problems)}, f)
    _leave()


def main() -> None:
    if sys.argv[1] == "images":
        return check_images(sys.argv[2], sys.argv[3:])
    model_dir, out, n, sharded = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model, processor = load_model(model_dir, dtype="fp32")
    # a random model rarely says end-of-turn: here a tenth of the vocabulary ends an answer, so answers stop at
    # different lengths and the processes finish generating at different steps
    vocab = model.config.get_text_config().vocab_size
    model.generation_config.eos_token_id = list(range(3, vocab, 10))
    reference = generate_greedy(model, processor, [item(i) for i in range(n)], max_new_tokens=24, batch_size=2)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in model.modules():
        if type(m).__name__ in ("MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer",
                                "MllamaVisionEncoderLayer"):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lengths = [len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in reference]
    shared = generate_greedy_shared(model, processor, n, item, sharded=sharded, max_new_tokens=24, batch_size=2)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"reference": reference, "shared": shared, "lengths": lengths,
                       "sharded_class": type(model).__name__}, f)
    _leave()


if __name__ == "__main__":
    main()
