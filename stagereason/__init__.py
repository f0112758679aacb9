"""stagereason: teach vision-language models to reason in explicit stages."""

from stagereason.stages import STAGES, StagedTrace, TraceFormatError, answers_match, parse_trace

__version__ = "0.1.0"

__all__ = ["STAGES", "StagedTrace", "TraceFormatError", "answers_match", "parse_trace", "__version__"]
