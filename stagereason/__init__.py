"""stagereason: teach vision-language models to reason in explicit stages."""

from stagereason.stages import STAGES, StagedTrace, TraceFormatError, answers_match, parse_trace

__version__ = "0.1.0"

__all__ = ["STAGES", "Reasoner", "ReasoningResult", "StagedTrace", "TraceFormatError", "answers_match",
           "parse_trace", "__version__"]


def __getattr__(name):  # the Reasoner pulls in torch and transformers: import it only when asked for
    if name in ("Reasoner", "ReasoningResult"):
        from stagereason.infer import reasoner

        return getattr(reasoner, name)
    raise AttributeError(f"module 'stagereason' has no attribute {name!r}")
