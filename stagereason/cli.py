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
    configs: Callable[[], tuple[type, ...]] | None = None  # lazy: keeps `--help` fast
    run: Callable[[], Callable] | None = None
    positionals: tuple[str, ...] = ()


def _tiny():
    from stagereason import tiny

    return tiny


def _validate():
    from stagereason.data_gen import validate

    return validate


def _train():
    from stagereason.train import runner

    return runner


def _infer():
    from stagereason.infer import run

    return run


def _eval():
    from stagereason.infer import evaluate

    return evaluate


def _export():
    from stagereason import export

    return export


def _gen():
    from stagereason.data_gen import runner

    return runner


VERBS: dict[str, Verb] = {
    "tiny-model": Verb(
        "Build a random tiny Mllama (real architecture and token layout) offline, for tests and the CPU demo.",
        configs=lambda: (_tiny().TinyModelConfig,), run=lambda: _tiny().run_tiny_model, positionals=("out_dir",),
    ),
    "gen": Verb(
        "Generate verified four-stage traces from a VQA source through a teacher, or from procedural scenes.",
        configs=lambda: (_gen().GenConfig,), run=lambda: _gen().run_gen,
    ),
    "validate": Verb(
        "Check a data.jsonl or gen output dir: lines, roles, placeholders, images, stage format.",
        configs=lambda: (_validate().ValidateConfig,), run=lambda: _validate().run_validate, positionals=("path",),
    ),
    "train": Verb(
        "Fine-tune a VLM on staged traces with TRL's SFTTrainer: QLoRA (default), LoRA or full fine-tuning.",
        configs=lambda: (_train().TrainConfig,), run=lambda: _train().run_train,
    ),
    "infer": Verb(
        "Answer a question about an image in four stages, with stage-level beam search (or another search).",
        configs=lambda: (_infer().InferConfig,), run=lambda: _infer().run_infer,
    ),
    "eval": Verb(
        "Accuracy, format rate, tokens and latency of a model and search over a dataset.",
        configs=lambda: (_eval().EvalConfig,), run=lambda: _eval().run_eval,
    ),
    "export": Verb(
        "Merge a train run's adapter into full-precision weights (or convert a full fine-tune), verified, atomic.",
        configs=lambda: (_export().ExportConfig,), run=lambda: _export().run_export,
    ),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: stagereason VERB [options]   (stagereason VERB --help for a verb's options)", "", "verbs:"]
    for name, verb in VERBS.items():
        note = "" if verb.run else "  [not available yet]"
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
    if verb.run is None:
        print(f"stagereason {name}: not available yet in this version of stagereason.", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        configs = parse_config(verb.configs(), rest, prog=f"stagereason {name}", description=verb.help,
                               positionals=verb.positionals)
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
