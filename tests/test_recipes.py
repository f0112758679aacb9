"""Every shipped recipe YAML opens with its exact command and parses against its verb (nothing is run).

Assets: the YAML files in data_gen/, train/ and infer/.
"""

import re
from pathlib import Path

import pytest

from stagereason.cli import VERBS
from stagereason.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for d in ("data_gen", "train", "infer") for p in (ROOT / d).rglob("*.yaml")
                 if "accelerate" not in p.parts)


def test_there_are_recipes():
    assert len(RECIPES) >= 7


@pytest.mark.parametrize("name", ["fsdp.yaml", "deepspeed_zero3.yaml"])
def test_accelerate_configs_parse_and_are_used_by_a_shown_command(name):
    import yaml

    path = ROOT / "train" / "accelerate" / name
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("FSDP", "DEEPSPEED") and cfg["num_processes"] >= 1
    assert f"accelerate launch --config_file train/accelerate/{name} -m stagereason.cli train" in path.read_text()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_opens_with_its_command_and_parses(path, monkeypatch):
    text = path.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    rel = path.relative_to(ROOT).as_posix()
    m = re.search(rf"stagereason(?:\.cli)? (\S+) --config {re.escape(rel)}", header)
    assert m, f"{rel} must open with the command that runs it"
    assert header.count("--config " + rel) >= 2, f"{rel} needs an override example after its command"
    verb = VERBS[m.group(1)]
    monkeypatch.chdir(ROOT)
    configs = parse_config(verb.configs(), ["--config", rel], prog=f"stagereason {m.group(1)}")
    assert configs


def test_the_eval_recipe_shows_skip_invalid(monkeypatch):
    monkeypatch.chdir(ROOT)
    (cfg,) = parse_config(VERBS["eval"].configs(), ["--config", "infer/eval.yaml", "--skip_invalid"])
    assert "skip_invalid:" in (ROOT / "infer" / "eval.yaml").read_text() and cfg.skip_invalid


def test_the_qlora_recipe_shows_the_eval_image_root(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    rel = "train/llama32v-11b-qlora.yaml"
    (cfg,) = parse_config(VERBS["train"].configs(), ["--config", rel])
    assert "eval_image_root:" in (ROOT / rel).read_text() and cfg.eval_image_root is None
    (cfg,) = parse_config(VERBS["train"].configs(), ["--config", rel, "--eval_split", str(tmp_path / "held.jsonl"),
                                                     "--eval_image_root", str(tmp_path / "images")])
    assert cfg.eval_image_root == str(tmp_path / "images")


def test_the_qlora_recipe_shows_the_lean_lora_dropout(monkeypatch):
    monkeypatch.chdir(ROOT)
    rel = "train/llama32v-11b-qlora.yaml"
    assert "lean_lora_dropout: true" in (ROOT / rel).read_text()
    (cfg,) = parse_config(VERBS["train"].configs(), ["--config", rel])
    assert cfg.lean_lora_dropout is True and cfg.lora_dropout == 0.05
    (cfg,) = parse_config(VERBS["train"].configs(), ["--config", rel, "--lean_lora_dropout", "false"])
    assert cfg.lean_lora_dropout is False
