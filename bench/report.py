"""``bench/results.md`` (the table, peers, method and noise notes) and ``bench/results.png``."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from bench import chaos
from bench.common import PI4_CORE_FACTOR, ROW_GOALS, ROW_ORDER, ROW_TITLES, Results

HERE = Path(__file__).resolve().parent
MD_PATH = HERE / "results.md"
PNG_PATH = HERE / "results.png"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def verdict(ok: bool | None) -> str:
    return {True: "✅ met", False: "❌ missed", None: "—"}[ok]


def table(res: Results) -> list[str]:
    lines = ["| figure | measured | goal (tiny.en int8, 2 cores) | | how |", "|---|---|---|---|---|"]
    for key in ROW_ORDER:
        row = res.rows.get(key)
        if row is None:
            lines.append(f"| {ROW_TITLES[key]} | not run | {ROW_GOALS[key]} | — | |")
            continue
        lines.append(f"| {row.figure} | {row.measured} | {row.goal} | {verdict(row.ok)} | {row.note} |")
    return lines


def markdown(res: Results) -> str:
    finished = time.time()
    load_now = os.getloadavg()
    mode = "QUICK (smoke-test sizes: figures are not meaningful)" if res.quick else "full"
    out = [
        "# omi-bridge benchmarks",
        "",
        f"`python -m bench` ({mode}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(res.started))}, "
        f"commit {_commit()}, {finished - res.started:.0f} s. Machine: {_cpu_model()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; tiny.en int8, beam 1, one ASR thread "
        "(the daemon's defaults).",
        "",
        *table(res),
        "",
        "## Machine noise",
        "",
        "The machine is shared (other engineers' tests and builds run beside the bench), so every "
        "figure is a median of repeated runs where affordable, with the spread in its row. Load "
        "average (1 / 5 / 15 min) when each part started, and at the end:",
        "",
        "| part | load average | took |",
        "|---|---|---|",
    ]
    for name, load in res.loads:
        took = res.durations.get(name)
        out.append(f"| {name} | {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} | "
                   f"{'' if took is None else f'{took:.0f} s'} |")
    out.append(f"| end | {load_now[0]:.2f} / {load_now[1]:.2f} / {load_now[2]:.2f} | |")
    out.append("")
    out.append("A load average above ~1 on these 2 cores means another process competed for a core "
               "during that part: CPU-time figures then rise a little (shared caches, frequency), "
               "wall-time figures (streams, latencies) more.")
    chaos_run = chaos.section()
    pi4 = [f"| {r.figure} | {r.pi4} |" for k in ROW_ORDER if (r := res.rows.get(k)) and r.pi4]
    if pi4:
        out += ["", "## On a Raspberry Pi 4 (estimates)", "",
                "Not measured on a Pi: the figures above scaled by how much slower a Pi 4 core is "
                f"(× {PI4_CORE_FACTOR:.0f}, docs/reference/performance-notes.md §6). Ratios of two "
                "figures taken on the same core keep their value; memory is the same libraries on "
                "aarch64.", "", "| figure | Pi 4 estimate |", "|---|---|", *pi4]
    for title, lines in [*res.sections, *([chaos_run] if chaos_run else [])]:
        out += ["", f"## {title}", "", *lines]
    out.append("")
    return "\n".join(out)


def plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    keys = [k for k in ROW_ORDER if k in res.rows and res.rows[k].ratio is not None]
    ratios = [res.rows[k].ratio or 0.0 for k in keys]
    colors = ["tab:green" if res.rows[k].ok else "tab:red" for k in keys]
    ax.barh([ROW_TITLES[k][:42] for k in keys], ratios, color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("measured / goal (≤ 1 meets it; for streams: goal / measured)")
    ax.set_title("Figures against their goals")
    ax.tick_params(axis="y", labelsize=8)

    ax = axes[0][1]
    wers = res.plots.get("wer", {})
    if wers:
        names = list(wers)
        ax.barh(names, [100 * wers[n] for n in names],
                color=["tab:gray" if "whole-file" in n else "tab:orange" if "SDK" in n else "tab:blue"
                       for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("WER, %")
        ax.tick_params(axis="y", labelsize=8)
    ax.set_title("Corpus WER (lower is better)")

    ax = axes[1][0]
    tl = res.plots.get("timeline", {})
    if tl:
        names = list(tl)
        ax.barh(names, [tl[n] for n in names],
                color=["tab:orange" if "SDK" in n else "tab:blue" for n in names])
        ax.axvline(0.0, color="black", linewidth=1)
        ax.invert_yaxis()
        ax.set_xlabel("decoded length − true length, s")
        ax.tick_params(axis="y", labelsize=8)
    ax.set_title("Timeline error on the same lossy packets")

    ax = axes[1][1]
    lags = res.plots.get("lags")
    delivery = res.plots.get("delivery")
    data, labels = [], []
    if lags:
        data.append(lags)
        labels.append("end of speech →\nsegment ready")
    if delivery:
        data.append(delivery)
        labels.append("conversation end →\nrequest sent")
    if data:
        ax.boxplot(data, tick_labels=labels)
        ax.set_ylabel("seconds")
    ax.set_title("Latencies")
    fig.suptitle(f"omi-bridge bench{' (QUICK)' if res.quick else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(res: Results, md_path: Path = MD_PATH, png_path: Path = PNG_PATH) -> None:
    md_path.write_text(markdown(res))
    plot(res, png_path)
