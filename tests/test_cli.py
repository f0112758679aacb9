"""The CLI: verbs table, help, YAML + flags, unknown keys and flags, unavailable verbs, safe output.

Assets: YAML files written here; models built by the `tiny-model` verb itself.
"""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from stagereason.cli import VERBS, main
from stagereason.config import ConfigError, parse_config

EXPECTED_VERBS = ["tiny-model", "gen", "validate", "train", "infer", "eval", "export"]


@dataclass
class _Opts:
    beam_size: int = field(default=4, metadata={"help": "candidates per stage"})
    judge: str = "self"
    temperature: float = 1.0
    out_dir: str = ""


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert list(VERBS) == EXPECTED_VERBS
    for verb in EXPECTED_VERBS:
        assert f"\n  {verb} " in out


def test_no_arguments_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "verbs:" in capsys.readouterr().out


def test_unknown_verb_suggests(capsys):
    assert main(["tiny_model"]) == 2
    assert "did you mean 'tiny-model'" in capsys.readouterr().err


def test_verb_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tiny-model", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for opt in ["--out_dir", "--out-dir", "--preset", "--seed", "--force", "--json", "--config"]:
        assert opt in out
    assert "usage: stagereason tiny-model OUT_DIR [options]" in out


def test_a_verb_not_available_yet_says_so_and_exits_2(monkeypatch, capsys):
    from stagereason.cli import Verb

    monkeypatch.setitem(VERBS, "distill", Verb("Distil a model (planned)."))
    assert main(["distill", "--anything"]) == 2
    assert "not available yet" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "distill     Distil a model (planned).  [not available yet]" in capsys.readouterr().out


def test_flags_accept_dashes_and_underscores():
    (a,) = parse_config((_Opts,), ["--beam_size", "2"])
    (b,) = parse_config((_Opts,), ["--beam-size", "3"])
    assert (a.beam_size, b.beam_size) == (2, 3)


def test_yaml_then_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beam-size: 8\njudge: loglik\ntemperature: 1e-5\n")
    (o,) = parse_config((_Opts,), ["--config", str(cfg), "--judge", "self"])
    assert (o.beam_size, o.judge, o.temperature) == (8, "self", 1e-5)


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beam_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'beam_sise' in .*c.yaml \(did you mean 'beam_size'\?\)"):
        parse_config((_Opts,), ["--config", str(cfg)])


@pytest.mark.parametrize("text,match", [("- a\n- b\n", "must hold a mapping"), ("a: [1,\n", "not valid YAML")])
def test_bad_yaml_is_a_clear_error(tmp_path, text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config((_Opts,), ["--config", str(cfg)])


@dataclass
class _Typed:
    peft: Literal["qlora", "lora", "none"] = "qlora"
    lora_r: int = 16
    learning_rate: float = 2e-4
    bf16: bool = False


@pytest.mark.parametrize("text,match", [
    ("peft: foo\n", r"peft: 'foo' in .*c.yaml is not one of qlora, lora, none"),
    ("lora_r: 8.5\n", r"lora_r: 8.5 in .*c.yaml is not a valid value"),
    ("lora_r: true\n", r"lora_r: True in .*c.yaml is not a valid value"),
    ("learning_rate: [1, 2]\n", r"learning_rate: \[1, 2\] in .*c.yaml must be a single value, not a list"),
    ("bf16: maybe\n", r"bf16: 'maybe' in .*c.yaml is not a valid value")])
def test_yaml_values_are_checked_like_flags(tmp_path, text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config((_Typed,), ["--config", str(cfg)])
    cfg.write_text("peft: lora\nlora_r: 8\nlearning_rate: 1e-3\nbf16: yes\n")  # YAML reads 1e-3 as a string
    (o,) = parse_config((_Typed,), ["--config", str(cfg)])
    assert (o.peft, o.lora_r, o.learning_rate, o.bf16) == ("lora", 8, 1e-3, True)


def test_two_config_files_are_refused_not_one_silently_dropped(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("beam_size: 8\n")
    with pytest.raises(ConfigError, match=r"--config given 2 times \(.*a.yaml, .*b.yaml\)"):
        parse_config((_Opts,), ["--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml")])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config((_Opts,), ["--config", str(tmp_path / "nope.yaml")])


def test_unknown_flag_is_an_error_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown option --beam_sze \(did you mean '--beam_size'\?\)"):
        parse_config((_Opts,), ["--beam_sze", "2"])
    with pytest.raises(ConfigError, match="unknown option --beam"):  # no abbreviations
        parse_config((_Opts,), ["--beam", "2"])
    # a training option transformers 5 replaced names its replacement, not a look-alike
    with pytest.raises(ConfigError, match=r"--group_by_length \(transformers 5 / TRL 1 replaced it: use "
                                          r"--train_sampling_strategy group_by_length\)"):
        parse_config((_Opts,), ["--group_by_length", "true"])


def test_a_misspelt_flag_is_named_before_the_options_it_left_out_are_missed(capsys):
    # export's own check ("--adapter and --out are required") used to speak first, about the wrong thing
    assert main(["export", "--adpter", "run", "--out", "x"]) == 2
    assert "unknown option --adpter (did you mean '--adapter'?)" in capsys.readouterr().err
    # a name of the same family comes first: --lora_r, not the closer-spelt --local_rank
    assert main(["train", "--lora_rank", "8"]) == 2
    assert "unknown option --lora_rank (did you mean '--lora_r'?)" in capsys.readouterr().err
    # a shard size export could not write is refused now, not once the model has merged
    assert main(["export", "--adapter", "run", "--out", "x", "--max_shard_size", "lots"]) == 2
    assert "--max_shard_size 'lots': a size such as 5GB" in capsys.readouterr().err


def test_json_output_is_the_one_object_alone(capsys):
    from stagereason.console import json_stdout, print_json

    with json_stdout():
        print("a library's notice")
        print_json({"a": 1})
    out, err = capsys.readouterr()
    assert out == '{"a": 1}\n' and err == "a library's notice\n"


def test_bad_value_type_exits_with_argparse_error():
    with pytest.raises(SystemExit):
        parse_config((_Opts,), ["--beam_size", "many"])


def test_tiny_model_verb_end_to_end_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["tiny-model", str(out), "--preset", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["image_token_id"] == result["text_vocab_size"]
    assert result["image_reaches_text"] is True
    files = sorted(p.name for p in out.iterdir())
    assert files == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "processor_config.json", "stagereason_tiny.json", "tokenizer.json", "tokenizer_config.json"]
    before = (out / "model.safetensors").read_bytes()
    assert main(["tiny-model", str(out), "--preset", "test", "--seed", "5"]) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before  # untouched
    assert main(["tiny-model", str(out), "--preset", "test", "--seed", "5", "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_console_script_runs(tmp_path):
    exe = [sys.executable, "-m", "stagereason.cli"]
    res = subprocess.run(exe + ["tiny-model", "--out-dir", str(tmp_path / "m"), "--preset", "test", "--presett", "x"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "unknown option --presett (did you mean '--preset'?)" in res.stderr
    assert not (tmp_path / "m").exists()


def test_no_flags_say_what_they_turn_off(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no_progress, --no-progress Turn off --progress." in out
    assert "--progress [PROGRESS] Show a progress bar." in out
