"""Shared fixtures. Every model here is built in code by stagereason.tiny (offline, seeded)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A `test`-preset tiny Mllama saved with save_pretrained (built by stagereason.tiny, seed 0)."""
    from stagereason.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path, preset="test", seed=0)
    return path
