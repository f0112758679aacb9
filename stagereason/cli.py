"""The ``stagereason`` command: one table of verbs, each parsing its dataclass config."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from stagereason.config import ConfigError, parse_config

__all__ = ["main", "VERBS"]


@dataclass(frozen=True)
class Verb:
    help: str
    target: str | None = None  # "module:ConfigClass:run_function", imported only when the verb runs
    positionals: tuple[str, ...] = ()

    def _load(self):
        import importlib

        module, config, run = self.target.split(":")
        mod = importlib.import_module(module)
        return getattr(mod, config), getattr(mod, run)

    def configs(self) -> tuple[type, ...]:
        return (self._load()[0],)

    def run(self) -> Callable:
        return self._load()[1]


VERBS: dict[str, Verb] = {
    "tiny-model": Verb(
        "Build a random tiny Mllama (real architecture and token layout) offline, for tests and the CPU demo.",
        "stagereason.tiny:TinyModelConfig:run_tiny_model", positionals=("out_dir",),
    ),
    "gen": Verb(
        "Generate verified four-stage traces from a VQA source through a teacher, or from procedural scenes.",
        "stagereason.data_gen.runner:GenConfig:run_gen",
    ),
    "validate": Verb(
        "Check a data.jsonl or gen output dir: lines, roles, placeholders, images, stage format.",
        "stagereason.data_gen.validate:ValidateConfig:run_validate", positionals=("path",),
    ),
    "train": Verb(
        "Fine-tune a VLM on staged traces with TRL's SFTTrainer: QLoRA (default), LoRA or full fine-tuning.",
        "stagereason.train.runner:TrainConfig:train_command",
    ),
    "infer": Verb(
        "Answer a question about an image in four stages, with stage-level beam search (or another search).",
        "stagereason.infer.run:InferConfig:run_infer",
    ),
    "eval": Verb(
        "Accuracy, format rate, tokens and latency of a model and search over a dataset.",
        "stagereason.infer.evaluate:EvalConfig:run_eval",
    ),
    "export": Verb(
        "Merge a train run's adapter into full-precision weights (or convert a full fine-tune), verified, atomic.",
        "stagereason.export:ExportConfig:run_export",
    ),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: stagereason VERB [options]   (stagereason VERB --help for a verb's options)", "", "verbs:"]
    for name, verb in VERBS.items():
        note = "" if verb.target else "  [not available yet]"
        lines.append(f"  {name:<{width}}  {verb.help}{note}")
    return "\n".join(lines)


def _setup_logging() -> None:
    level = os.environ.get("STAGEREASON_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stagereason").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from stagereason import __version__

        print(f"stagereason {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    verb = VERBS.get(name)
    if verb is None:
        import difflib

        close = difflib.get_close_matches(name, list(VERBS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"stagereason: unknown verb {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    if verb.target is None:
        print(f"stagereason {name}: not available yet in this version of stagereason.", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        configs = parse_config(verb.configs(), rest, prog=f"stagereason {name}", description=verb.help,
                               positionals=verb.positionals)
        if any(getattr(c, "json", False) for c in configs):
            from stagereason.console import json_stdout

            with json_stdout():
                result = verb.run()(*configs)
        else:
            result = verb.run()(*configs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"stagereason {name}: error: {err}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
