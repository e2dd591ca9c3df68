"""perf/e2e.py's picture: tokens/s per GPU over the run from the sampled counters, GPU utilization below,
the embedding phase shaded; without matplotlib a plain raster with the lines only."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def rate_series(tl: list) -> tuple:
    """(times, {gpu: tokens/s both models}, {"model/gpu": tokens/s}) between consecutive samples."""
    times, per_gpu, per_key = [], {}, {}
    for a, b in zip(tl, tl[1:]):
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue
        times.append(b["t"])
        sums = {}
        for key in set(a["tokens"]) | set(b["tokens"]):
            r = (b["tokens"].get(key, 0) - a["tokens"].get(key, 0)) / dt
            per_key.setdefault(key, []).append(r)
            gpu = key.split("/", 1)[1]
            sums[gpu] = sums.get(gpu, 0.0) + r
        for gpu, r in sums.items():
            per_gpu.setdefault(gpu, []).append(r)
    return times, per_gpu, per_key


def write_plot(path: Path, tl: list, window, title: str) -> str:
    """PNG of tokens/s per GPU over the run (+ GPU utilization); matplotlib, else a plain raster."""
    times, per_gpu, per_key = rate_series(tl)
    util_t = [s["t"] for s in tl if s["util"]]
    utils = {}
    for s in tl:
        for uuid, v in s["util"].items():
            utils.setdefault(uuid, []).append(v)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        _raw_png(path, times, per_gpu)
        return "raster (matplotlib absent: lines only, colours in GPU order)"
    fig, ax = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for i, (gpu, series) in enumerate(sorted(per_gpu.items())):
        color = [c / 255 for c in PALETTE[i % len(PALETTE)]]
        ax[0].plot(times, series, color=color, lw=1.8, label=f"gpu {gpu} (both models)")
        for key, s in sorted(per_key.items()):
            if key.endswith(f"/{gpu}"):
                ax[0].plot(times, s, color=color, lw=0.9, ls="--" if key.startswith("esm2") else ":",
                           label=f"gpu {gpu} {key.split('/')[0]}")
    if window and window[0] is not None:
        for a in ax:
            a.axvspan(window[0], window[1], color="0.92", zorder=0)
    ax[0].set_ylabel("tokens/s (embed_tokens_total)")
    ax[0].set_title(title, fontsize=9)
    ax[0].legend(fontsize=7, ncol=2)
    ax[0].grid(alpha=0.3)
    for i, (uuid, series) in enumerate(sorted(utils.items())):
        ax[1].plot(util_t[:len(series)], [100 * v for v in series], lw=1.2, label=uuid[-8:])
    ax[1].set_ylabel("nv_gpu_utilization %")
    ax[1].set_xlabel("seconds since the client started")
    ax[1].set_ylim(0, 105)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _raw_png(path: Path, times: list, per_gpu: dict, width: int = 900, height: int = 400) -> None:
    """A plain RGB PNG: axes and one line per GPU (no text), written with zlib only."""
    pixels = bytearray(b"\xff" * (width * height * 3))
    margin = 30

    def put(x, y, color):
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i:i + 3] = bytes(color)

    for x in range(margin, width - margin):
        put(x, height - margin, (0, 0, 0))
    for y in range(margin, height - margin):
        put(margin, y, (0, 0, 0))
    t_max = max(times) if times else 1.0
    v_max = max((max(s) for s in per_gpu.values() if s), default=1.0) or 1.0
    for k, (gpu, series) in enumerate(sorted(per_gpu.items())):
        color = PALETTE[k % len(PALETTE)]
        points = [(margin + int((t / t_max) * (width - 2 * margin - 1)),
                   height - margin - int((v / v_max) * (height - 2 * margin - 1))) for t, v in zip(times, series)]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for s in range(steps + 1):
                put(x0 + (x1 - x0) * s // steps, y0 + (y1 - y0) * s // steps, color)
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def plot_run(s) -> None:
    """The run's PNG beside its JSON (when the mixed run left a timeline); a failure is a note, since
    the figures matter more than the picture."""
    report = s.report
    if not report.get("timeline"):
        return
    png = s.out_dir / (s.json_path.stem + "_tokens_per_gpu.png")
    try:
        how = write_plot(png, report["timeline"], report.get("window"),
                         f"{report['config'].get('models_desc')}: tokens/s per GPU (shaded: embedding phase)")
        report["plot"] = {"path": str(png), "how": how}
    except Exception as e:  # the figures matter more than the picture
        report["notes"].append(f"plot failed: {type(e).__name__}: {e}")
