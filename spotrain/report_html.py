"""`spotrain report --html FILE`: one self-contained page (inline SVG plots drawn by matplotlib, no
script, no font or file fetched) with the report's headline, its plots and its tables.

Every artist that draws data (not axes, legends or the budget line) carries an SVG id starting
with `data-<plot>-` (matplotlib's `gid`), so a test can tell a drawn plot from an empty one."""

from __future__ import annotations

import html
import io
import time
from pathlib import Path

from spotrain.contracts.states import EndReason, InstanceState
from spotrain.errors import SpotrainError
from spotrain.report_data import format_duration, format_usd, planned_against_actual

WIDTH, HEIGHT = 8.0, 3.0  # inches, at matplotlib's 72 SVG units per inch
STYLE = """body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}table{border-collapse:collapse;margin:.5em 0}
td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}svg{max-width:100%;height:auto}.muted{color:#777}"""


def render(report: dict, series: dict) -> str:
    """The page for a report (spotrain.report.build_report) and its series (report_data.series)."""
    minutes = series["duration_seconds"] / 60.0
    colours = _location_colours(series, report)
    plots = [
        ("spend", "Spend against the budget", _spend_plot(series, report["budget_usd"], minutes)),
        ("fleet", "Fleet: one bar per instance, by location", _fleet_plot(series, colours, minutes)),
        ("progress", "Throughput and loss", _progress_plot(series, minutes)),
        ("cost", "Cost per 1M samples by location, against on demand", _cost_plot(report["locations"], colours)),
    ]
    title = f"spotrain report: {report['cluster']}, run {report['run']} ({report['state']})"
    figures = "\n".join(f'<h2>{html.escape(title)}</h2>\n<figure class="plot" data-plot="{name}">{svg}</figure>'
                        for name, title, svg in plots)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n{_headline(report)}\n{figures}\n"
            f"<h2>By location</h2>\n{_location_table(report['locations'])}\n"
            f"{_egress_table(report.get('egress_by_path', []))}"
            f'<p class="muted">written {time.strftime("%Y-%m-%d %H:%M:%S")} by spotrain from the cluster\'s '
            f"ledger</p>\n</body></html>\n")


def write_html(report: dict, series: dict, path: Path) -> None:
    page = render(report, series)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page)
    except OSError as error:
        raise SpotrainError(f"--html {path}: cannot write: {error.strerror}") from None


def _headline(report: dict) -> str:
    savings = report["savings_fraction"]
    on_demand = ("not in the catalog" if report["on_demand_usd"] is None
                 else f"${report['on_demand_usd']:.4f} (saved {savings:.0%})")
    rows = [
        ("Duration", format_duration(report["duration_seconds"])),
        ("Spent / budget", f"${report['spent_usd']:.4f} / ${report['budget_usd']:.2f}"),
        ("Of which egress", f"${report.get('egress_usd', 0.0):.4f}"),
        ("On demand it would cost", on_demand),
        ("Samples (global epoch)", f"{report['samples']:,} ({report['epochs']})"),
        *[(html.escape(key[0].upper() + key[1:]), html.escape(value))
          for key, value in planned_against_actual(report, "\u2192")],
        ("Loss first &rarr; last", f"{_number(report['loss_first'])} &rarr; {_number(report['loss_last'])}"),
        ("Preemptions (without notice)", f"{report['preemptions']} ({report['preemptions_without_notice']})"),
        ("Newest checkpoint",
         html.escape(report["checkpoint_path"] or f"none yet (in {report['checkpoint_dir']})")),
        ("End", html.escape(report["end_reason"] or "still running")),
    ]
    cells = "".join(f"<tr><th>{key}</th><td>{value}</td></tr>" for key, value in rows)
    return f'<table class="headline">{cells}</table>'


def _egress_table(paths: list[dict]) -> str:
    """Egress dollars by path; nothing when the run sent nothing that was charged."""
    if not paths:
        return ""
    rows = "".join(f"<tr><td>{html.escape(p['source'])}</td><td>{html.escape(p['destination'])}</td>"
                   f"<td>{p['gb']:.3f}</td><td>${p['usd']:.4f}</td></tr>" for p in paths)
    return f"<h2>Egress by path</h2>\n<table><tr><th>from</th><th>to</th><th>GB</th><th>spent</th></tr>{rows}</table>\n"


def _location_table(locations: list[dict]) -> str:
    head = "".join(f"<th>{name}</th>" for name in ("location", "instances", "instance-hours", "spent",
                                                  "samples", "$/1M samples", "on demand $/1M"))
    body = "".join(
        f"<tr><td>{html.escape(e['location'])}</td><td>{e['instances']}</td>"
        f"<td>{e['seconds'] / 3600:.4f}</td><td>${e['usd']:.4f}</td><td>{e['samples']:,}</td>"
        f"<td>{format_usd(e['cost_per_million_samples_usd'])}</td>"
        f"<td>{format_usd(e['on_demand_cost_per_million_samples_usd'])}</td></tr>" for e in locations)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH, HEIGHT))
    return figure, figure.subplots()


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):].strip()  # inline: without the XML declaration and doctype


def _empty(axes, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=axes.transAxes,
              color="#777")


def _spend_plot(series: dict, budget: float, minutes: float) -> str:
    figure, axes = _figure()
    times, spent = zip(*series["spend"])
    axes.step([t / 60.0 for t in times], spent, where="post", color="#1f77b4", label="spent", gid="data-spend")
    axes.axhline(budget, color="#d62728", linestyle="--", label=f"budget ${budget:g}")
    axes.set(xlabel="minutes since the run started", ylabel="USD", xlim=(0, max(minutes, 1 / 60)))
    axes.set_ylim(0, budget * 1.05)
    axes.legend(loc="center left")
    return _svg(figure)


def _fleet_plot(series: dict, colours: dict[str, str], minutes: float) -> str:
    figure, axes = _figure()
    fleet = series["fleet"]
    for row, member in enumerate(fleet):
        axes.barh(row, (member["end"] - member["start"]) / 60.0, left=member["start"] / 60.0, height=0.6,
                  color=colours[member["location"]], gid=f"data-fleet-bar-{row}")
        if member["state"] == InstanceState.PREEMPTED:
            announced = member["end_reason"] != EndReason.SPOT_PREEMPTION_WITHOUT_NOTICE
            axes.plot(member["end"] / 60.0, row, marker="v" if announced else "X", markersize=9,
                      color="#444" if announced else "#d62728", linestyle="none",
                      gid=f"data-fleet-{'preempted' if announced else 'preempted-without-notice'}-{row}")
    if not fleet:
        _empty(axes, "instance")
    handles = [_patch(colour, location) for location, colour in colours.items()]
    handles += [_marker("v", "#444", "preempted after a notice"),
                _marker("X", "#d62728", "preempted without notice")]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize="small")
    axes.set(xlabel="minutes since the run started", xlim=(0, max(minutes, 1 / 60)))
    axes.set_yticks(range(len(fleet)), [m["instance_id"] or "" for m in fleet], fontsize="x-small")
    axes.invert_yaxis()
    return _svg(figure)


def _progress_plot(series: dict, minutes: float) -> str:
    figure, axes = _figure()
    progress = series["progress"]
    if progress:
        axes.plot([t / 60.0 for t, _, _ in progress], [rate for _, rate, _ in progress], color="#2ca02c",
                  gid="data-progress-rate")
        losses = [(t / 60.0, loss) for t, _, loss in progress if loss is not None]
        if losses:
            twin = axes.twinx()
            twin.plot(*zip(*losses), color="#ff7f0e", gid="data-progress-loss")
            twin.set_ylabel("loss (mean of the workers)", color="#ff7f0e")
    else:
        _empty(axes, "training")
    axes.set(xlabel="minutes since the run started", xlim=(0, max(minutes, 1 / 60)))
    axes.set_ylabel("samples/s (all workers)", color="#2ca02c")
    return _svg(figure)


def _cost_plot(locations: list[dict], colours: dict[str, str]) -> str:
    figure, axes = _figure()
    priced = [e for e in locations if e["cost_per_million_samples_usd"] is not None]
    for index, entry in enumerate(priced):
        colour = colours[entry["location"]]
        axes.bar(index - 0.2, entry["cost_per_million_samples_usd"], width=0.4, color=colour,
                 gid=f"data-cost-spot-{index}")
        on_demand = entry["on_demand_cost_per_million_samples_usd"]
        if on_demand is not None:
            axes.bar(index + 0.2, on_demand, width=0.4, color="white", edgecolor=colour, hatch="//",
                     gid=f"data-cost-on-demand-{index}")
    if not priced:
        _empty(axes, "sample")
    axes.set_xticks(range(len(priced)), [e["location"] for e in priced])
    axes.set_ylabel("USD per 1M samples")
    axes.legend(handles=[_patch("#888", "spot, as run"), _patch("white", "on demand", hatch="//")],
                loc="upper left", fontsize="small")
    return _svg(figure)


def _location_colours(series: dict, report: dict) -> dict[str, str]:
    from matplotlib import colormaps

    names = sorted({m["location"] for m in series["fleet"]} | {e["location"] for e in report["locations"]})
    palette = colormaps["tab10"]
    return {name: _hex(palette(index % 10)) for index, name in enumerate(names)}


def _patch(colour: str, label: str, hatch: str | None = None):
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, edgecolor="#444" if hatch else colour, hatch=hatch, label=label)


def _marker(shape: str, colour: str, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], marker=shape, color=colour, linestyle="none", markersize=8, label=label)


def _hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(channel * 255):02x}" for channel in rgba[:3])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


