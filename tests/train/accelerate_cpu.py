"""``stagereason train`` under ``accelerate launch`` on CPU processes, for tests/train/test_distributed.py.

Run it with ``accelerate launch --config_file train/accelerate/<fsdp|deepspeed_zero3>.yaml --num_processes 2
--mixed_precision no``: accelerate then sets up FSDP2 or DeepSpeed ZeRO-3 exactly as for GPUs (the same
environment, wrapping or partitioning, sharded checkpoints), but it only shards over accelerators, so its backend
choice is replaced here by gloo on the CPU. Arguments are the ``stagereason`` command line.
"""

import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"


def _gloo(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


PartialState._prepare_backend = _gloo

from stagereason.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
