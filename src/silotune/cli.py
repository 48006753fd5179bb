"""The `silotune` command line: train, eval, report, demo, data, models, config, bench, attack."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from silotune import keygen
from silotune.attacks import cli as attacks_cli
from silotune.enclave import cli as enclave_cli
from silotune.errors import ConfigError, SilotuneError
from silotune.federated import cli as federated_cli
from silotune.split import cli as split_cli

app = typer.Typer(
    help="Fine-tune one LLM across silos whose data and model stay private.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build datasets.", no_args_is_help=True)
models_app = typer.Typer(help="List and export model presets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

console = Console(stderr=True)
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable)."),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    # Third-party progress bars and warnings would drown silotune's own output.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "peft", "datasets", "httpx", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    _setup_logging(verbose)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML job recipe (see configs/).")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in output_dir.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a job in the mode its config names (centralized, federated, split)."""
    from silotune.config import load_config
    from silotune.dispatch import run_job

    cfg = load_config(config, set_)
    summary = run_job(cfg, resume=resume, overwrite=overwrite, progress=progress)
    _print_scores("test", summary["test"])
    from silotune.adapters.spf import SPF_FILE

    extra = (
        f" + SPF row deltas in {SPF_FILE}"
        if (Path(summary["adapter"]) / SPF_FILE).is_file()
        else ""
    )
    console.print(f"adapter saved to {summary['adapter']} (PEFT format{extra})")
    from silotune.train.run_folder import report_hint

    console.print(report_hint(cfg.output_dir), soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run's output_dir (any mode; a split silo's or coordinator's).")
    ],
    out: Annotated[Path | None, typer.Option(help="Write here (default: RUN_DIR/report).")] = None,
) -> None:
    """Plot a run's loss, scores and wire bytes; write the PNGs and one self-contained HTML page."""
    from silotune.report import write_report

    written = write_report(run_dir, out)
    plots = ", ".join(p.name for p in written.plots) or "no metrics to plot"
    console.print(f"report written to {written.html} ({plots})", soft_wrap=True)


@app.command("eval")
def eval_(
    config: Annotated[Path, typer.Argument(help="YAML job recipe (model, data, task).")],
    adapter: Annotated[
        Path | None, typer.Option(help="PEFT adapter folder; omit for the base model.")
    ] = None,
    split: Annotated[str, typer.Option(help="validation or test.")] = "test",
    set_: SetOption = None,
) -> None:
    """Evaluate the base model, or the base model with an adapter, on a split."""
    from silotune.config import load_config
    from silotune.eval.runner import evaluate_job

    scores = evaluate_job(load_config(config, set_), adapter, split)
    _print_scores(split, scores)
    typer.echo(__import__("json").dumps({"split": split, **scores}))


@app.command()
def generate(
    config: Annotated[Path, typer.Argument(help="YAML job recipe (data.task: instruction).")],
    adapter: Annotated[
        Path | None, typer.Option(help="Adapter folder (PEFT format); none = the base model.")
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="One user message; the answer streams.")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(help="JSONL/CSV/Parquet of prompts (instruction[+input] or messages)."),
    ] = None,
    set_: SetOption = None,
) -> None:
    """Answer a prompt (streamed) or a file of prompts with the job's template and decoding."""
    from silotune.config import load_config
    from silotune.eval.generate import Generator, check_job, generate_lines

    if (prompt is None) == (file is None):
        raise ConfigError("pass --prompt TEXT or --file F (one of them)")
    cfg = load_config(config, set_)
    check_job(cfg)
    gen = Generator(cfg, adapter)
    if prompt is not None:
        gen.stream(prompt, write=lambda piece: print(piece, end="", flush=True))
        print()
        return
    assert file is not None
    for line in generate_lines(gen, file):
        typer.echo(line)


@app.command()
def demo(
    steps: Annotated[
        int,
        typer.Option(help="Centralized steps; other modes see as many examples (0: default)."),
    ] = 0,
    output_dir: Annotated[
        Path | None, typer.Option(help="Keep the runs here (default: temporary).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace runs already in --output-dir.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Run only these sections: centralized, federated, split."),
    ] = None,
    model: Annotated[
        str,
        typer.Option(help="smollm2-135m (a real model, ~6 min) or tiny-llama (quick, random)."),
    ] = "smollm2-135m",
) -> None:
    """Fine-tune SmolLM2-135M on the fortunes sample in every mode; print untuned vs trained."""
    from silotune.demo import SECTIONS, run_demo

    sections = tuple(only) if only else SECTIONS
    run_demo(
        steps or None, output_dir, Console(), overwrite=overwrite, sections=sections, model=model
    )


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Argument(help="YAML job recipe.")] = None,
    set_: SetOption = None,
    reference: Annotated[bool, typer.Option(help="Print every key as a Markdown table.")] = False,
) -> None:
    """Validate a recipe and print it with every default filled in (or the key reference)."""
    from silotune.config import dump_config, load_config, reference_markdown

    if reference:
        typer.echo(reference_markdown(), nl=False)
        return
    if config is None:
        raise typer.BadParameter("give a CONFIG file, or --reference")
    typer.echo(dump_config(load_config(config, set_)), nl=False)


@data_app.command("fortunes")
def data_fortunes(
    out: Annotated[Path, typer.Option(help="Folder for train/validation/test JSONL.")],
    categories: Annotated[int, typer.Option(help="Use the K largest categories.")] = 6,
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace files already in --out.")] = False,
) -> None:
    """Build the fortune-category classification dataset from Debian's `fortunes` package."""
    from silotune.data.fortunes import DEFAULT_ROOT, build_fortunes_splits, write_splits

    splits = build_fortunes_splits(DEFAULT_ROOT, categories=categories, seed=seed)
    write_splits(splits, out, overwrite=overwrite)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    console.print(f"wrote {out} ({sizes})")


@data_app.command("dictionaries")
def data_dictionaries(
    out: Annotated[Path, typer.Option(help="Folder for the split and multiple-choice JSONL.")],
    seed: Annotated[int, typer.Option(help="Seed of the split assignment and draws.")] = 0,
    max_chars: Annotated[int, typer.Option(help="Longest definition kept (characters).")] = 300,
    sample: Annotated[
        bool, typer.Option(help="Write the bundled dictionaries-sample exactly instead.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace files already in --out.")] = False,
) -> None:
    """Build "define this term" instruction data from FOLDOC, the Jargon File and WordNet."""
    from silotune.data import dictionaries as d

    missing = d.packages_missing()
    if missing:
        from silotune.errors import DataError

        raise DataError(
            f"the Debian packages {', '.join(missing)} are not installed; run "
            f"'apt-get install {' '.join(missing)}'"
        )
    if sample:
        splits, provenance = d.build_sample(), d.sample_provenance()
    else:
        splits = d.build_dictionary_splits(seed=seed, max_chars=max_chars)
        provenance = {"name": out.name, "seed": seed, "max_chars": max_chars}
    d.write_dataset(splits, out, overwrite=overwrite, provenance=provenance)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    console.print(f"wrote {out} ({sizes})")


@models_app.command("list")
def models_list() -> None:
    """List the built-in presets."""
    from silotune.models.presets import PRESETS

    for preset in PRESETS.values():
        typer.echo(f"{preset.name:14s} {preset.description}")


@models_app.command("export")
def models_export(
    name: Annotated[str, typer.Argument(help="Preset name or model folder (the adapter's base).")],
    out: Annotated[Path, typer.Option(help="Empty or new folder.")],
    merge: Annotated[
        bool, typer.Option(help="Fold the --adapter (LoRA, SPF) into the weights first.")
    ] = False,
    adapter: Annotated[
        Path | None, typer.Option(help="PEFT adapter folder to merge (with --merge).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="tiny-llama only: the seed its weights were built from.")
    ] = 0,
) -> None:
    """Write a preset, or a preset with a trained adapter merged in, as a Hugging Face folder."""
    if merge != (adapter is not None):
        raise ConfigError("--merge and --adapter DIR go together: pass both or neither")
    if adapter is not None:
        from silotune.adapters.merge import merge_adapter

        merge_adapter(name, adapter, out, seed=seed)
        console.print(f"exported {name} with {adapter} merged in to {out}")
        return
    from silotune.models.loading import export_model

    export_model(name, out, seed=seed)
    console.print(f"exported {name} to {out}")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark name (see --list).")] = "",
    quick: Annotated[
        bool, typer.Option(help="Smaller, faster variant (same output schema).")
    ] = False,
    list_: Annotated[bool, typer.Option("--list", help="List benchmarks.")] = False,
) -> None:
    """Run a benchmark against its baseline: a table, then one JSON line last."""
    from silotune.bench import BENCHMARKS, run_benchmark

    if list_ or not name:
        for key, (desc, _) in BENCHMARKS.items():
            typer.echo(f"{key:12s} {desc}")
        return
    run_benchmark(name, quick, Console())


# Packages keep their commands in their own cli/keygen modules; they are registered here, one way.
app.command()(split_cli.serve)
app.command()(split_cli.join)
app.command("keygen")(keygen.keygen)
enclave_cli.app.command("measure")(split_cli.enclave_measure)
app.add_typer(enclave_cli.app, name="enclave")
app.command()(attacks_cli.attack)
app.add_typer(federated_cli.app, name="federate")


def _print_scores(split: str, scores: dict[str, float]) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "examples")
    console.print(f"{split}: {shown}")


def main() -> None:
    """Entry point: user errors print one line and exit 1; usage errors exit 2."""
    try:
        code = app(standalone_mode=False)
    except SilotuneError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
