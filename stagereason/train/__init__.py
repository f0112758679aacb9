"""Fine-tune a VLM on staged traces: ``TrainConfig`` and ``run_train`` are what ``stagereason train`` runs.

Example:
    >>> from stagereason.train import TrainConfig, run_train
    >>> summary = run_train(TrainConfig(model_name_or_path="runs/tiny", dataset="runs/synthetic",
    ...                                 output_dir="runs/api", peft="lora", max_steps=20))
"""

__all__ = ["TrainConfig", "build_trainer", "run_train"]


def __getattr__(name):  # the runner pulls in torch, transformers and TRL: import it only when asked for
    if name in __all__:
        from stagereason.train import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'stagereason.train' has no attribute {name!r}")
