"""`silotune report`: plots and one self-contained page for a run of each mode; clean errors."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from silotune.config import load_config
from silotune.dispatch import run_job
from silotune.report import load_run, plot_run, write_report
from tests.conftest import assert_clean_error
from tests.federated.harness import run_in_process

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["data.max_length=64", "data.max_eval_examples=4", "train.batch_size=4"]


def tiny(recipe: str, out: Path, *overrides: str):
    """One of the repository's tiny recipes, shrunk to a few steps, writing to ``out``."""
    return load_config(ROOT / "configs" / recipe, [*SMALL, f"output_dir={out}", *overrides])


def check_page(run_dir: Path, plots: set[str], settings: str) -> str:
    """The report's PNGs exist, the page embeds exactly them and loads nothing from elsewhere."""
    out = run_dir / "report"
    assert {p.stem for p in out.glob("*.png")} == plots
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(plots)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG)
    assert not re.search(r"(href|src)=\"(?!data:)|https?://|<script", page)
    assert f"<td>{settings}</td>" in page  # the run's settings, as a table
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(PNG)
    return page


def labels(figure) -> list[str]:
    return sorted(text.get_text() for text in figure.axes[0].get_legend().get_texts())


def test_centralized_run_report_and_the_hint_train_prints(tmp_path, main_in_process):
    run = tmp_path / "run"
    overrides = [*SMALL, "train.max_steps=4", "train.eval_every=2", "train.log_every=1"]
    sets = [arg for item in overrides for arg in ("--set", item)]
    recipe = str(ROOT / "configs" / "centralized-tiny.yaml")
    trained = main_in_process(
        "train", recipe, *sets, "--set", f"output_dir={run}", "--no-progress", cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr
    assert f"silotune report {run}" in trained.stderr  # train says where the run is and how

    result = main_in_process("report", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "report.html" in result.stderr
    page = check_page(run, {"loss", "scores"}, "train.max_steps")
    assert "federation.rounds" not in page  # sections centralized never reads are left out
    figures = plot_run(load_run(run))
    assert figures["loss"].axes[0].get_xlabel() == "step"
    assert labels(figures["loss"]) == ["train"]
    assert labels(figures["scores"]) == [
        "test accuracy",
        "test macro_f1",
        "validation accuracy",
        "validation macro_f1",
    ]
    (line,) = figures["loss"].axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 2, 3, 4]


def test_federated_run_report_plots_rounds_and_upload_bytes(tmp_path):
    cfg = tiny(
        "federated-tiny.yaml",
        tmp_path / "run",
        "federation.rounds=2",
        "federation.silos=2",
        "federation.local_steps=1",
        "federation.secure_aggregation=none",
    )
    run_in_process(cfg)
    write_report(cfg.output_dir)
    check_page(cfg.output_dir, {"loss", "scores", "wire"}, "federation.rounds")
    figures = plot_run(load_run(cfg.output_dir))
    assert {f.axes[0].get_xlabel() for f in figures.values()} == {"round"}
    (line,) = figures["loss"].axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 2]
    assert "upload" in figures["wire"].axes[0].get_title()


@pytest.mark.slow  # two spawned silo processes: about 15 s
def test_split_run_report_draws_one_line_per_silo(tmp_path):
    cfg = tiny(
        "split-tiny.yaml",
        tmp_path / "run",
        "train.max_steps=2",
        "train.log_every=1",
        "train.eval_every=2",
        "split.sync_every=2",
    )
    run_job(cfg, progress=False)
    out = tmp_path / "custom"
    report = write_report(cfg.output_dir, out)
    assert report.html == out / "report.html"
    assert {p.name for p in report.plots} == {"loss.png", "scores.png", "wire.png"}
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Split sessions</h2>" in page and "split.head_layers" in page
    run = load_run(cfg.output_dir)
    assert run.silos == ["silo-0", "silo-1"]
    figures = plot_run(run)
    assert labels(figures["loss"]) == ["silo-0", "silo-1"]
    assert labels(figures["wire"]) == ["silo-0", "silo-1"]
    # A silo's own folder is a run too (what `silotune join` leaves on a silo's machine).
    write_report(cfg.output_dir / "silos" / "silo-1")
    assert (cfg.output_dir / "silos" / "silo-1" / "report" / "wire.png").is_file()


def test_a_coordinator_folder_and_a_torn_metrics_line_still_report(tmp_path):
    """A folder with a summary only (silotune serve), and a crash-torn last metrics line."""
    coordinator = tmp_path / "trunk"
    coordinator.mkdir()
    sessions = [{"silo": "silo-0", "peer": "ipv4:1", "outcome": "refused", "steps": 0,
                 "detail": "refused silo 'silo-0' at join: <adapter.r>"}]  # fmt: skip
    summary = {"mode": "split", "role": "coordinator", "sessions": sessions}
    (coordinator / "summary.json").write_text(json.dumps(summary))
    report = write_report(coordinator)
    assert report.plots == []
    page = report.html.read_text(encoding="utf-8")
    assert "recorded no training or evaluation metrics" in page
    assert "&lt;adapter.r&gt;" in page  # values are escaped

    silo = tmp_path / "silo"
    silo.mkdir()
    record = {"step": 1, "split": "train", "loss": 2.0, "bytes_sent": 4096}  # adapter-in-TEE
    (silo / "metrics.jsonl").write_text(json.dumps(record) + '\n{"step": 2, "spl')
    run = load_run(silo)
    assert len(run.records) == 1 and run.skipped_lines == 1
    assert "enclave" in plot_run(run)["wire"].axes[0].get_title()
    assert "1 unreadable lines skipped" in write_report(silo).html.read_text(encoding="utf-8")


def not_a_run(kind: str, folder: Path) -> Path:
    """A path `silotune report` must refuse."""
    folder.mkdir()
    if kind == "missing":
        return folder / "nowhere"
    if kind == "file":
        (folder / "notes.txt").write_text("x")
        return folder / "notes.txt"
    if kind == "parent-of-runs":  # e.g. `silotune demo --output-dir`: one run per mode inside
        for name in ("centralized", "split"):
            (folder / name).mkdir()
            (folder / name / "summary.json").write_text("{}")
    if kind == "bad-summary":
        (folder / "summary.json").write_text("{oops")
    return folder


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("empty", "is not a silotune run folder"),
        ("parent-of-runs", "holds runs in centralized, split"),
        ("bad-summary", "is not readable JSON"),
    ],
)
def test_a_folder_that_is_not_a_run_is_one_clear_error(kind, expected, tmp_path, main_in_process):
    target = not_a_run(kind, tmp_path / "given")
    assert_clean_error(main_in_process("report", str(target), cwd=tmp_path), expected)
