"""Job configuration: pydantic models validated in one place, loaded from YAML with `--set` overrides."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from silotune.config.enclave import EnclaveConfig
from silotune.config.federation import FederationConfig
from silotune.config.instruct import EvalConfig, InstructConfig
from silotune.config.split import SplitConfig
from silotune.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which base model to load and where to run it."""

    name: str = Field(
        "tiny-llama", description="preset (tiny-llama, smollm2-135m) or local HF folder"
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bf16 on CUDA with bf16 support, else fp32"
    )


class SPFConfig(_Strict):
    """Sparsification Parameter Fine-tuning: train chosen heads and FFN rows of the base weights."""

    enabled: bool = Field(
        False,
        description="train SPF-selected rows of the base weights alongside LoRA (docs/spf.md); "
        "LoRA then defaults to the projections SPF does not train",
    )
    head_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of attention heads trained in each of Q, K and V, top by L1 norm "
        "(ceil, at least one head)",
    )
    ffn_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of FFN neurons trained, top by L1 norm of their up-projection row; "
        "the gate projection trains the same neurons (ceil, at least one)",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="peak learning rate of the SPF rows (their own AdamW group, same schedule); "
        "null = train.lr",
    )


class AdapterConfig(_Strict):
    """The trainable adapter; the base model stays frozen."""

    type: Literal["lora", "prefix"] = Field("lora", description="LoRA or P-tuning v2 prefix")
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2*r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | None = Field(
        None, description="modules that get LoRA; default per architecture (q and v projections)"
    )
    num_virtual_tokens: int = Field(16, gt=0, description="prefix length for type: prefix")
    placement: Literal["ree", "enclave"] = Field(
        "ree",
        description="where the adapter and its optimizer state live: ree = with the model; "
        "enclave = only inside the enclave, the frozen linear work done in the REE on masked inputs",
    )
    spf: SPFConfig = Field(
        default_factory=SPFConfig,
        description="SPF + LoRA: sparse base-weight deltas trained with LoRA on the other targets",
    )

    @model_validator(mode="after")
    def _spf_needs_lora(self) -> AdapterConfig:
        if self.spf.enabled and self.type != "lora":
            raise ValueError("adapter.spf is combined with LoRA; set adapter.type to lora")
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class DataConfig(_Strict):
    """Dataset and task."""

    dataset: str = Field(
        "fortunes-sample",
        description="fortunes-sample (bundled), fortunes (Debian package), dictionaries-sample "
        "(bundled, task instruction), dictionaries (Debian packages, task instruction), or a "
        "folder holding train/validation/test files (JSONL, JSON, CSV or Parquet)",
    )
    task: Literal["classification", "lm", "instruction"] = Field(
        "classification",
        description="classification (label likelihood), lm (every token), instruction "
        "(prompt -> response, loss on the response; docs/instruct.md)",
    )
    max_length: int = Field(
        128, ge=8, le=8192, description="tokens per example, prompt + label (or response)"
    )
    prompt_template: str | None = Field(
        None, description="classification prompt with {text}; default depends on the dataset"
    )
    max_eval_examples: int | None = Field(
        None, gt=0, description="evaluate on at most this many examples per split (None = all)"
    )
    instruct: InstructConfig = Field(
        default_factory=InstructConfig,
        description="prompt template and lengths of task: instruction",
    )

    @field_validator("prompt_template")
    @classmethod
    def _has_text_slot(cls, value: str | None) -> str | None:
        if value is not None and "{text}" not in value:
            raise ValueError("must contain the placeholder {text}")
        return value

    @model_validator(mode="after")
    def _instruct_lengths_fit(self) -> DataConfig:
        if self.task != "instruction" or self.instruct.max_response_length is None:
            return self
        room = self.max_length - self.instruct.max_response_length
        if room < 4:
            raise ValueError(
                f"data.instruct.max_response_length {self.instruct.max_response_length} leaves "
                f"{room} prompt tokens in data.max_length {self.max_length}; keep at least 4"
            )
        return self


class TrainConfig(_Strict):
    """Optimisation and bookkeeping."""

    max_steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR schedule"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None = off")
    seed: int = Field(0, ge=0, description="seed for model init, data order and dropout")
    eval_every: int = Field(50, gt=0, description="evaluate and checkpoint every N steps")
    log_every: int = Field(10, gt=0, description="log training loss every N steps")
    eval_batch_size: int = Field(16, gt=0, description="sequences per evaluation forward pass")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept on disk (newest)")
    threads: int | None = Field(
        None,
        gt=0,
        description="torch threads per process; None = the cores divided among the processes "
        "the job runs on this machine (simulated silos, split's coordinator and silos, enclaves), "
        "at most OMP_NUM_THREADS if set",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder block's activations in backward instead of keeping "
        "them: less memory for long sequences, about one more forward of compute",
    )


class JobConfig(_Strict):
    """A silotune job. `mode` chooses how it runs; the other sections say what it trains."""

    mode: Literal["centralized", "federated", "split"] = Field(
        "centralized", description="centralized reference, federated (Flower), or split (U-shaped)"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: Path = Field(Path("runs/job"), description="where checkpoints and metrics go")
    federation: FederationConfig = Field(default_factory=FederationConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    enclave: EnclaveConfig = Field(default_factory=EnclaveConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        # `model: tiny-llama` is shorthand for `model: {name: tiny-llama}`.
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _targets_only_for_lora(self) -> JobConfig:
        if self.adapter.type == "prefix" and self.adapter.target_modules is not None:
            raise ValueError("adapter.target_modules applies to type lora only")
        return self

    @model_validator(mode="after")
    def _checkpointing_combinations(self) -> JobConfig:
        if not self.train.gradient_checkpointing:
            return self
        if self.adapter.placement == "enclave":
            raise ValueError(
                "train.gradient_checkpointing does not work with adapter.placement enclave: "
                "recomputing a block would ask the REE for a second product under the same mask"
            )
        if self.adapter.type == "prefix":
            raise ValueError(
                "train.gradient_checkpointing does not work with prefix adapters (PEFT refuses "
                "it: the checkpointed blocks would drop the prefix); use adapter.type lora"
            )
        return self

    @model_validator(mode="after")
    def _instruction_modes(self) -> JobConfig:
        if self.data.task != "instruction":
            return self
        if self.adapter.placement == "enclave":
            raise ValueError(
                "data.task instruction does not run with adapter.placement enclave; use ree"
            )
        return self


# --------------------------------------------------------------------------- loading and errors


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at the parent of `loc` (for 'unknown key' messages)."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(err: ValidationError) -> str:
    """Turn pydantic's first error into one sentence naming the field path and what is allowed."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc) or "<top level>"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{path}' (allowed: {', '.join(allowed)}){hint}"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not loc:  # a cross-field check; its message names the fields itself
        return f"invalid config: {message}"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    more = len(err.errors()) - 1
    tail = f"; and {more} more error(s)" if more else ""
    return f"invalid value for '{path}': {message}{shown}{tail}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `a.b=value`; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-4), got '{item}'")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set key '{key}' is not a dotted path like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        # "Q: {text}" reads as a YAML block mapping; on a command line it means the string.
        # A section is still settable with flow syntax: adapter={type: prefix}.
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b=value` override set (creating sections as needed)."""
    result = copy.deepcopy(data)  # (not a YAML round trip: callers may pass Path values)
    for item in overrides:
        parts, value = parse_override(item)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part == "model":
                child = {"name": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> JobConfig:
    """Validate a job dict (after overrides), raising ConfigError with one clear sentence."""
    if not isinstance(data, dict):
        raise ConfigError("a job config must be a mapping of keys to values at the top level")
    merged = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML recipe and validate it."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    return config_from_dict(data, overrides)


def dump_config(config: JobConfig) -> str:
    """Serialise a validated config back to YAML (saved next to every run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """Every config key with its type, default and description, as Markdown (docs/config.md)."""
    lines = [
        "# Job configuration reference",
        "",
        "Generated by `silotune config --reference` from the pydantic models in",
        "`src/silotune/config.py`; a test keeps this file in sync with the code.",
        "",
    ]
    for name, field in JobConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += [f"## `{name}`", "", (annotation.__doc__ or "").strip(), ""]
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            lines += _section_rows(name, annotation)
            lines.append("")
    top = [
        _reference_row(n, f)
        for n, f in JobConfig.model_fields.items()
        if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))
    ]
    head = ["## top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(lines[:5] + head + top + [""] + lines[5:]).rstrip() + "\n"


def _section_rows(prefix: str, section: type[BaseModel]) -> list[str]:
    """Rows of every key of ``section``, nested sections (adapter.spf) flattened after it."""
    rows: list[str] = []
    for key, sub in section.model_fields.items():
        annotation = sub.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _section_rows(f"{prefix}.{key}", annotation)
        else:
            rows.append(_reference_row(f"{prefix}.{key}", sub))
    return rows


def _reference_row(key: str, field: Any) -> str:
    if get_origin(field.annotation) is Literal:
        kind = "one of " + ", ".join(str(a) for a in get_args(field.annotation))
    else:
        kind = (
            str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        )
        kind = kind.replace("pathlib.", "").replace(" | ", " or ")
    default = field.default if field.default_factory is None else field.default_factory()
    shown = "null" if default is None else str(default)
    return f"| `{key}` | {kind} | `{shown}` | {field.description or ''} |"
