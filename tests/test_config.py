"""Tests for silotune.config: the documented recipe, one clear ConfigError per mistake, --set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from silotune.config import (
    JobConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
from silotune.errors import ConfigError

RECIPE = """\
mode: centralized
model: tiny-llama
adapter: {type: lora, r: 8}
data: {dataset: fortunes-sample, task: classification}
train: {max_steps: 20, batch_size: 8, lr: 1.0e-3, seed: 0, eval_every: 10}
output_dir: runs/demo
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_documented_recipe_loads_as_written(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, RECIPE))
    assert cfg.mode == "centralized"
    assert cfg.model.name == "tiny-llama"
    assert (cfg.adapter.type, cfg.adapter.r, cfg.adapter.lora_alpha) == ("lora", 8, 16.0)
    assert (cfg.data.dataset, cfg.data.task) == ("fortunes-sample", "classification")
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.lr, t.seed, t.eval_every) == (20, 8, 1e-3, 0, 10)
    assert cfg.output_dir == Path("runs/demo")


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, RECIPE), ["adapter.alpha=4", "train.max_grad_norm=null"])
    again = load_config(write(tmp_path, dump_config(cfg), "dumped.yaml"))
    assert again == cfg
    assert again.adapter.lora_alpha == 4.0 and again.train.max_grad_norm is None


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == JobConfig()


# (yaml text, overrides, substrings the one-sentence message must contain)
ERRORS = [
    pytest.param(
        RECIPE.replace("train:", "trian:"),
        [],
        ["unknown key 'trian'", "did you mean 'train'"],
        id="typo-top-level",
    ),
    pytest.param(
        RECIPE.replace("max_steps", "max_step"),
        [],
        ["unknown key 'train.max_step'", "did you mean 'max_steps'", "batch_size"],
        id="typo-nested",
    ),
    pytest.param(
        RECIPE.replace("r: 8", "r: eight"),
        [],
        ["'adapter.r'", "valid integer", "'eight'"],
        id="wrong-type",
    ),
    pytest.param(
        RECIPE.replace("type: lora", "type: lorra"),
        [],
        ["'adapter.type'", "'lora' or 'prefix'", "'lorra'"],
        id="bad-literal",
    ),
    pytest.param(
        RECIPE, ["model.dtype=float8"], ["'model.dtype'", "'bfloat16'", "'float8'"], id="bad-dtype"
    ),
    pytest.param(
        RECIPE, ["train.max_steps=0"], ["'train.max_steps'", "greater than 0"], id="range"
    ),
    pytest.param(RECIPE, ["train.lr"], ["--set expects key=value", "'train.lr'"], id="set-no-eq"),
    pytest.param(RECIPE, ["train..lr=1"], ["--set key 'train..lr'"], id="set-empty-part"),
    pytest.param(RECIPE, ["=1"], ["--set key ''"], id="set-no-key"),
    pytest.param(RECIPE, ["trian.lr=1"], ["unknown key 'trian'"], id="set-typo"),
    pytest.param(
        RECIPE,
        ["data.prompt_template=no slot"],
        ["'data.prompt_template'", "{text}"],
        id="template-without-slot",
    ),
    pytest.param(
        RECIPE,
        ["adapter.type=prefix", "adapter.target_modules=[q_proj]"],
        ["adapter.target_modules applies to type lora only"],
        id="cross-field",
    ),
    pytest.param(
        RECIPE,
        ["data.task=instruction", "data.instruct.templte=chat"],
        ["unknown key 'data.instruct.templte'", "did you mean 'template'", "system_prompt"],
        id="instruct-typo",
    ),
    pytest.param(
        RECIPE,
        ["data.task=instruction", "data.instruct.template=jinja"],
        ["'data.instruct.template'", "'auto', 'chat' or 'plain'", "'jinja'"],
        id="instruct-template",
    ),
    pytest.param(
        RECIPE,
        ["data.task=instruction", "data.max_length=64", "data.instruct.max_response_length=62"],
        ["data.instruct.max_response_length 62 leaves 2 prompt tokens", "data.max_length 64"],
        id="instruct-lengths",
    ),
    pytest.param(
        RECIPE,
        ["data.task=instruction", "adapter.placement=enclave"],
        ["data.task instruction does not run with adapter.placement enclave"],
        id="instruct-enclave",
    ),
    pytest.param(RECIPE, ["eval.top_p=1.5"], ["'eval.top_p'", "1.5"], id="eval-top-p"),
    pytest.param(
        RECIPE, ["eval.max_new_tokns=8"], ["did you mean 'max_new_tokens'"], id="eval-typo"
    ),
    pytest.param("- a\n- b\n", [], ["mapping"], id="top-level-list"),
    pytest.param("train:\n  lr: [1,\n", [], ["not valid YAML", "line"], id="invalid-yaml"),
]


@pytest.mark.parametrize(("text", "overrides", "expected"), ERRORS)
def test_each_mistake_is_one_clear_config_error(
    tmp_path: Path, text: str, overrides: list[str], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_missing_file_folder_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("train.lr=1e-4", ["train", "lr"], "1e-4"),  # YAML 1.1 reads this as a string ...
        ("train.lr=0.5", ["train", "lr"], 0.5),
        ("train.max_steps=7", ["train", "max_steps"], 7),
        (
            "adapter.target_modules=[q_proj, k_proj]",
            ["adapter", "target_modules"],
            ["q_proj", "k_proj"],
        ),
        ("train.max_grad_norm=null", ["train", "max_grad_norm"], None),
        ("data.prompt_template=Q: {text}\\nA:", ["data", "prompt_template"], "Q: {text}\\nA:"),
        ("adapter={type: prefix}", ["adapter"], {"type": "prefix"}),
        ("output_dir=", ["output_dir"], ""),
        ("model=a=b", ["model"], "a=b"),
    ],
)
def test_parse_override(item: str, key: list[str], value: object) -> None:
    assert parse_override(item) == (key, value)


def test_overrides_apply_and_validate() -> None:
    cfg = config_from_dict(
        {"model": "tiny-llama", "train": {"lr": 1e-3}},
        [
            "train.lr=1e-4",  # ... and pydantic turns the string into the float
            "train.max_steps=7",
            "adapter.target_modules=[q_proj, k_proj]",
            "model.dtype=float32",  # into the shorthand `model: tiny-llama`
            "data.prompt_template=Q: {text} A:",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.max_steps == 7
    assert cfg.adapter.target_modules == ["q_proj", "k_proj"]
    assert (cfg.model.name, cfg.model.dtype) == ("tiny-llama", "float32")
    assert cfg.data.prompt_template == "Q: {text} A:"


def test_model_shorthand_via_set_and_overrides_leave_input_alone() -> None:
    data = {"model": {"name": "tiny-llama", "dtype": "float32"}}
    merged = apply_overrides(data, ["model=/models/x", "federation.silos=4"])
    assert merged["model"] == "/models/x"
    assert data == {"model": {"name": "tiny-llama", "dtype": "float32"}}  # not mutated
    cfg = config_from_dict(data, ["model=/models/x"])
    assert cfg.model.name == "/models/x" and cfg.model.dtype == "auto"


def test_python_callers_may_pass_paths_with_overrides(tmp_path: Path) -> None:
    cfg = config_from_dict({"output_dir": tmp_path / "run"}, ["train.lr=0.5"])
    assert cfg.output_dir == tmp_path / "run" and cfg.train.lr == 0.5


# ----------------------------------------------------------------------------- through the CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "silotune.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("text", "args", "expected"),
    [
        (RECIPE.replace("max_steps", "max_stepz"), [], "did you mean 'max_steps'"),
        (RECIPE.replace("batch_size: 8", "batch_size: many"), [], "'train.batch_size'"),
        (RECIPE.replace("type: lora", "type: adapter"), [], "'lora' or 'prefix'"),
        ("train: [1,\n", [], "not valid YAML"),
        (RECIPE, ["--set", "train.lr"], "--set expects key=value"),
        (RECIPE, ["--set", "train.seed=-1"], "'train.seed'"),
        (None, [], "does not exist"),
    ],
    ids=["typo", "type", "literal", "yaml", "set-syntax", "set-range", "missing-file"],
)
def test_cli_config_errors_are_one_line_without_traceback(
    tmp_path: Path, text: str | None, args: list[str], expected: str
) -> None:
    path = write(tmp_path, text) if text is not None else tmp_path / "missing.yaml"
    for command in (["config", str(path), *args], ["train", str(path), *args]):
        result = run_cli(*command, cwd=tmp_path)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error:") and expected in lines[0]
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_cli_config_prints_the_validated_recipe(tmp_path: Path) -> None:
    path = write(tmp_path, RECIPE)
    result = run_cli("config", str(path), "--set", "train.lr=2e-4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = load_config(write(tmp_path, result.stdout, "shown.yaml"))
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.train.max_steps == 20 and cfg.train.grad_accum == 1  # defaults filled in


@pytest.mark.parametrize(
    "recipe", ["centralized-instruct-tiny.yaml", "centralized-instruct-smollm2.yaml"]
)
def test_instruction_recipes_validate(recipe: str) -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / recipe)
    assert (cfg.mode, cfg.data.task) == ("centralized", "instruction")
