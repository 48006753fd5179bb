"""`silotune report RUN_DIR`: PNG plots and one self-contained HTML page from a run folder.

Reads what every mode writes (:mod:`silotune.train.run_folder`): ``metrics.jsonl``,
``summary.json`` and ``config.yaml``; where the run folder has no ``metrics.jsonl`` of its own but
per-silo folders ``silos/<name>/`` do, their records are read, each under its silo's name. It draws,
with matplotlib's Agg canvas (no display needed):

* ``loss.png``: training loss against step (federated: round), one line per silo where records
  name silos; validation loss too where the task records one (``data.task: lm``);
* ``scores.png``: validation accuracy, macro-F1 or ROUGE-L against step or round, the test scores
  as points at the end;
* ``wire.png``: bytes on the wire where the run recorded them (split: sealed frames of a logged
  step, both ways, per silo; federated: one silo's upload in a round; adapter-in-TEE: masked
  inputs the enclave sent to the REE in a logged step);

and ``report.html``: the plots embedded as base64 PNG, the test scores, the summary, each split
session, and the run's settings (``config.yaml``) as tables. The page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from silotune.errors import RunFolderError
from silotune.train.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_DIR,
    SILOS_DIR,
    SUMMARY_FILE,
    flatten_keys,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["REPORT_HTML", "Report", "Run", "load_run", "plot_run", "write_report"]

REPORT_HTML = "report.html"
SCORE_KEYS = ("accuracy", "macro_f1", "rouge_l", "exact_match", "mc_accuracy")  # scores in [0, 1]
UNUSED_SECTIONS = {  # config sections a mode never reads: left out of the settings table
    "centralized": ("federation", "split"),
    "federated": ("split",),
    "split": ("federation",),
}
WIRE_KEYS = {  # metrics key -> the plot's title
    "wire_bytes": "Bytes on the wire (sealed frames of the logged step, both ways)",
    "upload_bytes_per_silo": "Bytes on the wire (one silo's upload in the round)",
    "bytes_sent": "Bytes out of the enclave (masked inputs to the REE in the logged step)",
}


@dataclass
class Run:
    """What a run folder holds, as read from its files."""

    folder: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    skipped_lines: int = 0  # metrics lines that were not JSON objects (a crash can tear one)

    @property
    def x_key(self) -> str:
        """``round`` for federated runs (their records say so), else ``step``."""
        return "round" if any("round" in r for r in self.records) else "step"

    @property
    def silos(self) -> list[str]:
        """The silos records name, sorted; empty when records name none."""
        return sorted({str(r["silo"]) for r in self.records if r.get("silo") is not None})


@dataclass
class Report:
    """Where a report was written."""

    html: Path
    plots: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _read_metrics(path: Path, silo: str | None) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of ``path`` that carry a numeric ``step``, and how many were not."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} is not readable text ({exc})") from None
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            skipped += 1
            continue
        if silo is not None:
            record.setdefault("silo", silo)
        records.append(record)
    return records, skipped


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _not_a_run(folder: Path) -> RunFolderError:
    runs = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_dir() and ((p / SUMMARY_FILE).is_file() or (p / METRICS_FILE).is_file())
    )
    if runs:
        return RunFolderError(
            f"{folder} is not a run folder but holds runs in {', '.join(runs)}; "
            f"report one of them (silotune report {folder / runs[0]})"
        )
    return RunFolderError(
        f"{folder} is not a silotune run folder: it has neither {METRICS_FILE} nor {SUMMARY_FILE} "
        "(pass the output_dir of a run)"
    )


def load_run(folder: Path) -> Run:
    """Read a run folder; raises RunFolderError with one sentence if it is not one."""
    folder = Path(folder)
    if not folder.exists():
        raise RunFolderError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is a file; pass a run's output_dir (a folder)")
    metrics, summary = folder / METRICS_FILE, folder / SUMMARY_FILE
    silo_files = sorted((folder / SILOS_DIR).glob(f"*/{METRICS_FILE}"))
    if not metrics.is_file() and not summary.is_file() and not silo_files:
        raise _not_a_run(folder)
    records: list[dict[str, Any]] = []
    skipped = 0
    if metrics.is_file():
        records, skipped = _read_metrics(metrics, None)
    else:  # a run whose silos kept their own metrics (a split run that did not finish)
        for path in silo_files:
            more, bad = _read_metrics(path, path.parent.name)
            records += more
            skipped += bad
    config: dict[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
        try:
            loaded = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RunFolderError(f"{folder / CONFIG_FILE} is not readable YAML ({exc})") from None
        config = loaded if isinstance(loaded, dict) else {}
    return Run(
        folder=folder,
        config=config,
        summary=_read_json(summary) if summary.is_file() else {},
        records=records,
        skipped_lines=skipped,
    )


# --------------------------------------------------------------------------- plots


def _series(
    records: Iterable[dict[str, Any]], split: str, key: str, x_key: str
) -> dict[str, tuple[list[float], list[float]]]:
    """``{silo or "": (xs, ys)}`` of ``key`` in ``split`` records, in x order."""

    def x(record: dict[str, Any]) -> float:
        value = record.get(x_key)
        return float(value if _is_number(value) else record["step"])

    out: dict[str, tuple[list[float], list[float]]] = {}
    points = [r for r in records if r.get("split") == split and _is_number(r.get(key))]
    for record in sorted(points, key=x):
        xs, ys = out.setdefault(str(record.get("silo") or ""), ([], []))
        xs.append(x(record))
        ys.append(float(record[key]))
    return out


def _label(silo: str, what: str) -> str:
    """A line's legend: what it shows, after the silo it comes from where records name one."""
    return f"{silo} {what}" if silo else what


def _figure(title: str, x_key: str, y_label: str) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    FigureCanvasAgg(figure)  # draws to PNG without a display or pyplot's global state
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(x_key)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _loss_figure(run: Run) -> Figure | None:
    x_key = run.x_key
    train = _series(run.records, "train", "loss", x_key)
    validation = _series(run.records, "validation", "loss", x_key)
    if not train and not validation:
        return None
    figure, axes = _figure("Training loss", x_key, "loss")
    for silo, (xs, ys) in sorted(train.items()):
        axes.plot(xs, ys, marker="." if len(xs) < 30 else None, label=silo or "train")
    for silo, (xs, ys) in sorted(validation.items()):
        axes.plot(xs, ys, linestyle="--", marker="o", label=_label(silo, "validation"))
    axes.legend(fontsize="small")
    return figure


def _scores_figure(run: Run) -> Figure | None:
    x_key = run.x_key
    curves = {
        (key, silo): points
        for key in SCORE_KEYS
        for silo, points in _series(run.records, "validation", key, x_key).items()
    }
    tests = {
        (key, silo): points
        for key in SCORE_KEYS
        for silo, points in _series(run.records, "test", key, x_key).items()
    }
    if not curves and not tests:
        return None
    figure, axes = _figure("Evaluation scores", x_key, "score")
    colors = {}
    for (key, silo), (xs, ys) in sorted(curves.items()):
        (line,) = axes.plot(xs, ys, marker="o", label=_label(silo, f"validation {key}"))
        colors[key, silo] = line.get_color()
    for (key, silo), (xs, ys) in sorted(tests.items()):
        label = _label(silo, f"test {key}")
        color = colors.get((key, silo))  # the test point in its validation curve's colour
        if color is None:  # a test-only score (instruction's mc_accuracy): a colour of its own
            color = colors[key, silo] = f"C{len(colors) % 10}"
        axes.scatter(xs, ys, marker="*", s=140, zorder=3, color=color, label=label)
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize="small")
    return figure


def _wire_figure(run: Run) -> Figure | None:
    x_key = run.x_key
    for key, title in WIRE_KEYS.items():
        series = _series(run.records, "train", key, x_key)
        if not series:
            continue
        peak = max(max(ys) for _, ys in series.values())
        unit, scale = ("MiB", 2**20) if peak >= 2**20 else ("KiB", 2**10)
        figure, axes = _figure(title, x_key, unit)
        for silo, (xs, ys) in sorted(series.items()):
            axes.plot(xs, [y / scale for y in ys], marker=".", label=silo or key)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize="small")
        return figure
    return None


def plot_run(run: Run) -> dict[str, Figure]:
    """The report's figures by file stem (``loss``, ``scores``, ``wire``); absent ones left out."""
    figures = {
        "loss": _loss_figure(run),
        "scores": _scores_figure(run),
        "wire": _wire_figure(run),
    }
    return {name: figure for name, figure in figures.items() if figure is not None}


# --------------------------------------------------------------------------- page


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = "null" if value is None else str(value)
    return html.escape(text if len(text) <= 400 else text[:397] + "...")


def _table(rows: Iterable[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td { font-family: ui-monospace, monospace; font-size: 0.9em; }
img { max-width: 100%; } .note { color: #666; }
"""


def _page(run: Run, images: dict[str, bytes]) -> str:
    mode = run.summary.get("mode") or run.config.get("mode") or "unknown"
    role = run.summary.get("role")
    title = f"silotune run: {run.folder.resolve().name}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Folder <code>{html.escape(str(run.folder))}</code>; mode <b>{html.escape(mode)}"
        f"</b>{f' ({html.escape(str(role))})' if role else ''}; {len(run.records)} metrics "
        f"records{f' ({run.skipped_lines} unreadable lines skipped)' if run.skipped_lines else ''}"
        f"{'; silos ' + html.escape(', '.join(run.silos)) if run.silos else ''}.</p>",
    ]
    test = run.summary.get("test")
    if isinstance(test, dict) and test:
        parts += ["<h2>Test</h2>", _table(sorted(test.items()), ("score", "value"))]
    if images:
        parts.append("<h2>Plots</h2>")
        for name, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<p><img alt="{name}" src="data:image/png;base64,{data}"></p>')
    else:
        parts.append('<p class="note">This run recorded no training or evaluation metrics.</p>')
    summary = {
        key: value
        for key, value in flatten_keys(run.summary).items()
        if not key.startswith("test.") and key.rpartition(".")[2] != "sessions"
    }
    if summary:
        parts += ["<h2>Summary</h2>", _table(summary.items(), ("key", "value"))]
    split = run.summary.get("split")
    sessions = run.summary.get("sessions") or (
        split.get("sessions") if isinstance(split, dict) else None
    )
    if isinstance(sessions, list) and sessions:
        columns = ("silo", "peer", "outcome", "steps", "detail")
        rows = [tuple(s.get(c) for c in columns) for s in sessions if isinstance(s, dict)]
        parts += ["<h2>Split sessions</h2>", _table(rows, columns)]
    if run.config:
        unused = UNUSED_SECTIONS.get(str(run.config.get("mode")), ())
        used = {k: v for k, v in run.config.items() if k not in unused}
        parts += [
            f"<h2>Settings</h2><p>From <code>{CONFIG_FILE}</code>"
            + (
                f" (sections this mode does not read left out: {', '.join(unused)})"
                if unused
                else ""
            )
            + ".</p>",
            _table(flatten_keys(used).items(), ("key", "value")),
        ]
    else:
        parts.append(f'<p class="note">No {CONFIG_FILE} in this folder.</p>')
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(run_dir: Path, out_dir: Path | None = None) -> Report:
    """Read ``run_dir``, write its PNG plots and ``report.html`` to ``out_dir`` (default
    ``run_dir/report``); returns where they are."""
    import io

    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.folder / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    report = Report(html=out / REPORT_HTML)
    images: dict[str, bytes] = {}
    for name, figure in plot_run(run).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        images[name] = buffer.getvalue()
        path = out / f"{name}.png"
        path.write_bytes(images[name])
        report.plots.append(path)
    report.html.write_text(_page(run, images), encoding="utf-8")
    return report
