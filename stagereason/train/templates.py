"""The training chat template: the model's own layout plus ``{% generation %}`` markers around assistant turns."""

from __future__ import annotations

from pathlib import Path

__all__ = ["training_chat_template"]

_DIR = Path(__file__).with_name("templates")
_PROBES = {  # contents as parts, as TRL's collator gives them to the training template
    "a two-turn conversation about an image": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<SUMMARY> a </SUMMARY>"}]},
        {"role": "user", "content": [{"type": "text", "text": "And squares?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ],
    "a question without an image": [  # Llama-3.2-Vision writes its system header (and today's date) here
        {"role": "user", "content": [{"type": "text", "text": "Is 7 prime?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ],
    "a system turn and a question without an image": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in stages."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is 7 prime?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ],
}


def training_chat_template(processor, model_type: str, path: str | Path | None = None) -> str:
    """Return a chat template with generation markers that renders exactly like the model's own.

    Mllama gets our copy of Llama-3.2-Vision's template; other models get
    TRL's training template for their chat template, or ``path``.

    Raises:
        ValueError: no training template is known for this model (pass
            ``--chat_template_path``), or the template does not render like the model's own.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if path is not None:
        template = Path(path).read_text(encoding="utf-8")
    elif model_type == "mllama":
        template = (_DIR / "llama32_vision_training.jinja").read_text(encoding="utf-8")
    else:
        try:
            template = get_training_chat_template(processor)
        except (ValueError, TypeError) as err:
            raise ValueError(f"no training chat template is known for {model_type}: write a copy of its template "
                             "with {% generation %}...{% endgeneration %} around each assistant turn's text and "
                             f"end-of-turn token and pass --chat_template_path ({err})") from err
    if not has_generation_markers(template):
        raise ValueError("the training chat template has no {% generation %} markers")
    if processor.chat_template is not None:
        _check_renders_alike(processor, template)
    return template


def _check_renders_alike(processor, template: str) -> None:
    """The training template writes each probe as the model's own writes it at inference (a system turn in the
    form the model's template reads: ``infer.generate.fit_system_turns``); a probe the model's template refuses
    is not compared."""
    from jinja2 import TemplateError

    from stagereason.infer.generate import fit_system_turns

    for what, probe in _PROBES.items():
        try:
            own = processor.apply_chat_template(fit_system_turns(probe, processor), tokenize=False)
        except TemplateError:
            continue
        try:
            ours = processor.apply_chat_template(probe, tokenize=False, chat_template=template)
        except TemplateError as err:
            ours = f"(refused: {err})"
        if own != ours:
            raise ValueError(f"the training chat template does not render {what} like the model's own template:\n"
                             f"  model: {own!r}\n  ours:  {ours!r}\npass --chat_template_path with a matching copy")
