"""What the tiny VLM builders of the tests share: a small byte-level BPE tokenizer and the model's chat template
as TRL ships it (TRL also ships its training variant, with generation marks)."""

from pathlib import Path

CORPUS = ("<SUMMARY> I will count the red objects. </SUMMARY> <CAPTION> The image shows a red circle. </CAPTION> "
          "<REASONING> one red circle. </REASONING> <CONCLUSION> 1 </CONCLUSION> How many? ")


def tiny_tokenizer(template_name: str, specials: list[str], words: str = "", **kwargs):
    """A ``PreTrainedTokenizerFast`` over a BPE trained on the staged-answer words (plus ``words``), with
    ``specials`` added and TRL's ``chat_templates/<template_name>.jinja`` as its chat template."""
    import trl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([CORPUS + words] * 50, trainers.BpeTrainer(
        vocab_size=len(alphabet) + 200, initial_alphabet=alphabet, show_progress=False))
    tok.add_special_tokens(specials)
    template = (Path(trl.__file__).parent / f"chat_templates/{template_name}.jinja").read_text(encoding="utf-8")
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, model_max_length=4096, **kwargs)
