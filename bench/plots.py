"""Pictures of the benchmarks: PNGs drawn from the raw samples the bench scripts save.

    pip install -e '.[bench]'            # matplotlib
    python bench/track.py --jobs 1000 --time-scale 2 --save /tmp/track.json
    python bench/track.py --events --no-baseline --jobs 1000 10000 --save /tmp/events.json
    python bench/dispatch.py --save /tmp/dispatch.json
    python bench/ingest.py --save /tmp/ingest.json
    python bench/footprint.py --jobs 1000 --runs 1 --step 100 --save /tmp/footprint.json
    python bench/plots.py --track /tmp/track.json --dispatch /tmp/dispatch.json \\
        --ingest /tmp/ingest.json --footprint /tmp/footprint.json      # into bench/plots/

One figure per input (`--track` gives two, three from `track.py --events`), each written to
`--out`:

- `detection_lag_cdf.png` (track): the share of jobs whose end was seen within x seconds,
  orchestrator against the Airflow-hook baseline, with the 5 s target;
- `describe_calls.png` (track): describe calls in each poll-cap window (5 s unscaled) over the
  run, both sides, against ceil(N/100), N the jobs open at the stand-in: one full-batch round
  per window;
- `events_lag_cdf.png` (track with `--events`): the detection lag tracking by polling and by
  events, a curve each per N, with the modelled delivery delay of the jobs' terminal events
  (dashed): the events curve's distance from it is the daemon's own share;
- `dispatch_rate.png` (dispatch): launches per second at the stand-in after N jobs are sent at
  once, against each launch bucket's sustained rate;
- `ack_latency_cdf.png` (ingest): paced submit ack latency with `synchronous` FULL and NORMAL,
  with the floors (a reply with no store or thread; an fdatasync) and the 2 ms target;
- `rss_vs_jobs.png` (footprint): the daemon's and the keeper's memory, and the host's
  MemAvailable drop, against running local jobs, with the 1.5 MiB-per-job target.

Each figure carries, in small print, the command and the load average its samples came from.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import orjson
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

BENCH = Path(__file__).resolve().parent
SIZE = (8.0, 4.5)  # inches
DPI = 100
OURS, THEIRS, IDEAL, FLOOR = "tab:blue", "tab:red", "black", "0.55"
EVENTS = "tab:green"  # orchestrator tracking by events (track.py --events)


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def new_figure() -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def finish(fig: Figure, data: dict[str, Any], path: Path) -> Path:
    """Source line at the bottom, tight layout, PNG at the fixed size."""
    source = "\n".join([*textwrap.wrap(str(data.get("command", "?")), 150), machine(data)])
    fig.text(0.01, 0.01, source, fontsize=6.5, color="0.4", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.02 + 0.025 * source.count("\n"), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def machine(data: dict[str, Any]) -> str:
    """The CPUs and the load averages a bench saved, in one line."""

    def load(key: str) -> str:
        return " ".join(f"{value:.2f}" for value in data[key])

    loads = (
        f"load average {load('load_at_start')} at the start, {load('load_at_end')} at the end"
        if "load_at_start" in data and "load_at_end" in data
        else "load average not saved"
    )
    return (
        f"{data.get('cpus', '?')} CPUs, {loads}; "
        "a host shared with other work: the figures are noisy"
    )


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank, as the bench tables use (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] if ordered else math.nan


def ecdf(ax: Axes, values: Sequence[float], **style: Any) -> None:
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(xs, ys, where="post", **style)


def seconds(value: float, _pos: object = None) -> str:
    return f"{value:g}"


def positive(values: np.ndarray) -> np.ndarray:
    """Zeros (and less) as gaps, for a log axis."""
    return np.where(values > 0, values, np.nan)


# -- track.py -----------------------------------------------------------------------------------


def track_run(data: dict[str, Any]) -> dict[str, Any]:
    """The run to draw: the first with a baseline side, else the first."""
    runs: list[dict[str, Any]] = data["runs"]
    with_baseline = [r for r in runs if len(r["sides"]) > 1]
    return (with_baseline or runs)[0]


def side_label(side: dict[str, Any]) -> str:
    if side["side"] != "orchestrator":
        return "Airflow BatchClientHook polling"
    parts = [part for part in (side.get("store"), side.get("mode")) if part]
    return f"orchestrator ({', '.join(parts)})" if parts else "orchestrator"


def side_color(side: dict[str, Any]) -> str:
    if side["side"] != "orchestrator":
        return THEIRS
    return EVENTS if side.get("mode") == "events" else OURS


def plot_detection_lag(data: dict[str, Any], out: Path) -> Path:
    settings, run = data["settings"], track_run(data)
    fig, ax = new_figure()
    for side in run["sides"]:
        lags = [lag for lag in side["lags"] if lag is not None]
        if not lags:
            continue
        label = (
            f"{side_label(side)}: p50 {quantile(lags, 50):.1f} s, p99 {quantile(lags, 99):.1f} s"
        )
        if side["failed"]:
            label += f" ({side['failed']} tasks failed)"
        ecdf(ax, [max(lag, 0.01) for lag in lags], color=side_color(side), label=label)
    ax.axvline(5.0, color=IDEAL, linestyle="--", linewidth=1, label="target: p99 ≤ 5 s")
    ax.axhline(0.99, color=FLOOR, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(seconds))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("detection lag: the job ends at the stand-in → seen ended (s, log scale)")
    ax.set_ylabel("jobs whose end was seen within x")
    ax.set_title(
        f"Detection lag, {run['jobs']:,} {settings['backend'].capitalize()} jobs "
        f"(time scale {settings['time_scale']:g}, describe budget "
        f"{settings['describe_rate']:g} calls/s)"
    )
    ax.legend(loc="upper left", fontsize=9)
    return finish(fig, data, out / "detection_lag_cdf.png")


def open_jobs(jobs: Sequence[Sequence[float | None]], at: np.ndarray) -> np.ndarray:
    """Jobs created and not yet reported terminal at the stand-in, at each epoch in `at`."""
    created = np.sort(np.asarray([j[0] for j in jobs], dtype=float))
    reported = np.sort(np.asarray([j[2] for j in jobs if j[2] is not None], dtype=float))
    opened = np.searchsorted(created, at, side="right")
    closed = np.searchsorted(reported, at, side="right")
    return np.asarray(opened - closed)


def per_window(side: dict[str, Any], window_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window midpoints (epoch), describe calls and per-round allowance in each window."""
    at = np.asarray(side["samples"]["at"], dtype=float)
    calls = np.asarray(side["samples"]["describe_calls"], dtype=float)
    allowance = np.asarray(side["samples"]["round_calls"], dtype=float)
    start = float(side["started_at"])
    edges = np.arange(start, at[-1] + 1e-6, window_s)  # whole windows only
    if len(edges) < 2:
        edges = np.asarray([start, at[-1]])
    mids = (edges[:-1] + edges[1:]) / 2
    return (
        mids,
        np.diff(np.interp(edges, at, calls)),
        np.diff(np.interp(edges, at, allowance)),
    )


def plot_describe_calls(data: dict[str, Any], out: Path) -> Path:
    settings, run = data["settings"], track_run(data)
    scale, cap_s = float(settings["time_scale"]), float(settings["cap_s"])
    window_wall = cap_s / scale
    fig, ax = new_figure()
    ideal: tuple[np.ndarray, np.ndarray] | None = None
    for side in run["sides"]:
        if not side["samples"].get("at"):
            continue
        ours = side["side"] == "orchestrator" and side.get("mode") != "events"
        mids, calls, allowance = per_window(side, window_wall)
        t = (mids - side["started_at"]) * scale
        total, rounds = sum(calls), sum(allowance)
        ratio = f"{total / rounds:.2f}" if rounds else "n/a"
        ax.plot(
            t,
            positive(calls),
            color=side_color(side),
            label=f"{side_label(side)}: {side['calls']:,} calls, "
            f"{side['ids_mean']:.1f} ids/call, {ratio}x the per-round allowance",
        )
        if ours and ideal is None:
            ideal = t, np.ceil(open_jobs(side["standin_jobs"], mids) / 100)
    if ideal is not None:
        ax.step(
            ideal[0],
            positive(ideal[1]),
            where="mid",
            color=IDEAL,
            linestyle="--",
            linewidth=1,
            label=f"ceil(N/100): one round of full batches per {cap_s:g} s "
            "(N: orchestrator's jobs open at the stand-in)",
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(seconds))
    ax.set_xlabel("time since the first submit (s, unscaled)")
    ax.set_ylabel(f"describe calls per {cap_s:g} s window (log scale)")
    ax.set_title(
        f"Describe calls per {cap_s:g} s poll round, {run['jobs']:,} "
        f"{settings['backend'].capitalize()} jobs (time scale {scale:g})"
    )
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 20)  # room for the legend above the curves
    ax.legend(loc="upper right", fontsize=8)
    return finish(fig, data, out / "describe_calls.png")


def shades(cmap: str, count: int) -> list[Any]:
    """`count` colors of a sequential colormap, darkest last, none too pale."""
    colors = plt.get_cmap(cmap)(np.linspace(0.5, 0.95, max(count, 1)))
    return list(colors)


def plot_events_lag(data: dict[str, Any], out: Path) -> Path:
    """Detection lag by polling and by events, one curve per N and mode; the terminal events'
    modelled delivery delay dashed (pooled over N: one model)."""
    settings, runs = data["settings"], data["runs"]
    model = settings.get("event_model") or {}
    scale = float(settings["time_scale"])
    fig, ax = new_figure()
    fig.set_size_inches(SIZE[0], SIZE[1] + 0.15 * (2 * len(runs) + 1))  # room for the legend
    colors = {"polling": shades("Blues", len(runs)), "events": shades("Greens", len(runs))}
    delays: list[float] = []
    for i, run in enumerate(runs):
        for side in run["sides"]:
            mode, lags = side.get("mode"), side["lags"]
            if side["side"] != "orchestrator" or mode not in colors or not lags:
                continue
            store = f" {side['store']}," if side.get("store") else ""
            label = (
                f"{mode},{store} N = {run['jobs']:,}: p50 {quantile(lags, 50):.2f} s, "
                f"p99 {quantile(lags, 99):.2f} s"
            )
            if mode == "events":
                delays += side["event_delays"]
                label += f"; above the model p99 {quantile(side['above_model'], 99):.2f} s"
            if side["failed"]:
                label += f" ({side['failed']} failed)"
            ecdf(ax, [max(lag, 0.01) for lag in lags], color=colors[mode][i], label=label)
    if delays:
        ecdf(
            ax,
            [max(d, 0.01) for d in delays],
            color=IDEAL,
            linestyle="--",
            linewidth=1,
            label=f"modelled delivery delay of the terminal event: p50 "
            f"{quantile(delays, 50):.2f} s, p99 {quantile(delays, 99):.2f} s (lognormal, "
            f"median {model.get('delay_median_s', math.nan):g} s, "
            f"p99 {model.get('delay_p99_s', math.nan):g} s)",
        )
    ax.axhline(0.99, color=FLOOR, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(seconds))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(
        f"detection lag: the job ends at the stand-in → stored (s, log scale; polling x time "
        f"scale {scale:g}, events in wall seconds)",
        fontsize=9,
    )
    ax.set_ylabel("jobs whose end was stored within x")
    ax.set_title(
        f"Detection lag, polling against events, {settings['backend'].capitalize()} "
        f"(describe budget {settings['describe_rate']:g} calls/s)"
    )
    if ax.get_legend_handles_labels()[0]:  # below the axes: the curves fill the corners
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7.5, frameon=False)
    return finish(fig, data, out / "events_lag_cdf.png")


# -- dispatch.py --------------------------------------------------------------------------------

LAUNCH_NAMES = {"ecs": "ECS RunTask", "batch": "Batch SubmitJob"}


def plot_dispatch_rate(data: dict[str, Any], out: Path) -> Path:
    fig, ax = new_figure()
    colors = {"ecs": "tab:blue", "batch": "tab:green"}
    jobs = 0
    for row in data["rows"]:
        launches = np.asarray(row["launches"], dtype=float) - float(row["started_at"])
        if len(launches) == 0:
            continue
        jobs = max(jobs, row["jobs"])
        edges = np.arange(0.0, math.ceil(launches.max()) + 1.0, 1.0)
        counts, _ = np.histogram(launches, bins=edges)
        color = colors.get(row["backend"], "tab:purple")
        name = LAUNCH_NAMES.get(row["backend"], row["backend"])
        steady = row["steady_rate"]
        share = f"{100 * steady / row['rate']:.1f} %" if steady else "n/a"
        ax.step(
            edges[:-1],
            counts,
            where="post",
            color=color,
            label=f"{name}: steady {steady:.1f}/s = {share} of the bucket",
        )
        ax.axhline(
            row["rate"],
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"{name} bucket: {row['rate']:g}/s, burst {row['burst']:g}",
        )
    ax.set_xlabel("time since the jobs were sent (s)")
    ax.set_ylabel("launches per second (1 s bins)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Dispatch of {jobs:,} jobs sent at once, against AWS's launch buckets")
    ax.legend(loc="upper right", fontsize=8)
    return finish(fig, data, out / "dispatch_rate.png")


# -- ingest.py ----------------------------------------------------------------------------------

FLOOR_NAMES = ("floor: reply with no store, no thread", "floor: fdatasync of 4 KiB")


def plot_ack_latency(data: dict[str, Any], out: Path) -> Path:
    settings = data["settings"]
    fig, ax = new_figure()
    for mode, color in (("FULL", "tab:blue"), ("NORMAL", "tab:orange")):
        if mode not in data["modes"]:
            continue
        ms = [v * 1000 for v in data["modes"][mode]["latencies_s"]]
        label = f"{mode}: p50 {quantile(ms, 50):.2f} ms, p99 {quantile(ms, 99):.2f} ms"
        ecdf(ax, ms, color=color, label=label)
    for floor, name, style in zip(data.get("floors", []), FLOOR_NAMES, (":", "-."), strict=False):
        ms = [v * 1000 for v in floor["latencies_s"]]
        label = f"{name}: p99 {quantile(ms, 99):.2f} ms"
        ecdf(ax, ms, color=FLOOR, linestyle=style, linewidth=1, label=label)
    ax.axvline(2.0, color=IDEAL, linestyle="--", linewidth=1, label="target: p99 ≤ 2 ms")
    ax.axhline(0.99, color=FLOOR, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(seconds))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("ack latency: request sent → reply read (ms, log scale)")
    ax.set_ylabel("requests answered within x")
    ax.set_title(
        f"Submit ack latency, one at a time at {settings['rate']:,.0f}/s "
        f"({settings['paced']:,} per mode; acked once committed)"
    )
    ax.legend(loc="lower right", fontsize=8, title="store.synchronous", title_fontsize=8)
    return finish(fig, data, out / "ack_latency_cdf.png")


# -- footprint.py -------------------------------------------------------------------------------


def plot_footprint(data: dict[str, Any], out: Path) -> Path:
    """Two panels: what the host loses (against the target), and the two processes' own
    memory on a scale of their own."""
    fig, (host, procs) = plt.subplots(1, 2, figsize=SIZE, dpi=DPI)
    for ax in (host, procs):
        ax.grid(True, which="major", alpha=0.3)
    series = (
        ("daemon_rss_mib", "daemon (orchestrator serve): RSS", "tab:blue"),
        ("keeper_rss_mib", "keeper (forks, reaps the jobs): RSS", "tab:green"),
        ("keeper_pss_mib", "keeper: PSS", "tab:olive"),
    )
    top = 0
    for i, run in enumerate(data["runs"]):
        levels = run["levels"]
        running = [level["running"] for level in levels]
        top = max(top, *running)
        style: dict[str, Any] = {"marker": "o", "markersize": 3, "alpha": 1.0 if i == 0 else 0.5}
        host.plot(
            running,
            [level["mem_available_drop_mib"] for level in levels],
            color="tab:purple",
            label=f"drop of MemAvailable: {run['per_job_mib']:.2f} MiB per job" if i == 0 else None,
            **style,
        )
        for key, label, color in series:
            values = [level[key] for level in levels]
            grows = (values[-1] - values[0]) / max(1, running[-1] - running[0]) * 1024
            procs.plot(
                running,
                values,
                color=color,
                label=f"{label}, +{grows:.1f} KiB per job" if i == 0 else None,
                **style,
            )
    xs = np.asarray([0, top])
    host.plot(xs, 1.5 * xs, color=IDEAL, linestyle="--", linewidth=1, label="target: 1.5 MiB/job")
    host.set_title("The host: every running job's cost", fontsize=10)
    host.set_ylabel("MemAvailable drop since no job ran (MiB)")
    procs.set_title("The daemon and its keeper", fontsize=10)
    procs.set_ylabel("memory (MiB)")
    procs.set_ylim(0, procs.get_ylim()[1] * 1.5)  # room for the legend
    for ax in (host, procs):
        ax.set_xlabel("local jobs RUNNING (sleep 600)")
        ax.legend(loc="upper left", fontsize=7.5)
    host.set_ylim(bottom=min(0.0, host.get_ylim()[0]))
    fig.suptitle(f"Memory against running local jobs, 0 to {top:,}")
    return finish(fig, data, out / "rss_vs_jobs.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    parser.add_argument("--track", type=Path, help="bench/track.py --save output")
    parser.add_argument("--dispatch", type=Path, help="bench/dispatch.py --save output")
    parser.add_argument("--ingest", type=Path, help="bench/ingest.py --save output")
    parser.add_argument("--footprint", type=Path, help="bench/footprint.py --save output")
    parser.add_argument("--out", type=Path, default=BENCH / "plots", help="PNG directory")
    args = parser.parse_args()
    written: list[Path] = []
    if args.track:
        track = load(args.track)
        written += [plot_detection_lag(track, args.out), plot_describe_calls(track, args.out)]
        if track["settings"].get("events"):
            written.append(plot_events_lag(track, args.out))
    if args.dispatch:
        written.append(plot_dispatch_rate(load(args.dispatch), args.out))
    if args.ingest:
        written.append(plot_ack_latency(load(args.ingest), args.out))
    if args.footprint:
        written.append(plot_footprint(load(args.footprint), args.out))
    if not written:
        parser.error("nothing to draw: give at least one of --track, --dispatch, --ingest, ...")
    for path in written:
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
