"""Turn a pytest-benchmark ``--benchmark-json`` file into a Markdown table and a roofline plot.

    .venv/bin/pytest bench/ --benchmark-only --benchmark-json out.json
    .venv/bin/python bench/report.py out.json --markdown out.md --plot roofline.png

The table has one row per benchmark, grouped as pytest-benchmark grouped them: mean and median
time, the speedup over the group's baseline (the benchmark whose ``extra_info`` says
``baseline: true``, what a user would write without prefixkv; "n/a" in a group with none
marked: no guessing), GB/s, GFLOP/s and the roofline fraction that ``bench/conftest.py:
record`` put in ``extra_info``, plus any other scalar extra_info.

The plot is a roofline: achieved GB/s (bytes read + written, record's convention) against the
machine's read and copy bandwidth measured in the same run (``read_gbps``/``copy_gbps`` in
extra_info) for every benchmark that moved bytes, and, for those that also did arithmetic,
achieved GFLOP/s against min(peak, read bandwidth x intensity).
Not part of the test run (its name does not match ``test_*``/``bench_*``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

#: extra_info keys shown in their own columns (the rest go to "details").
_LIMIT_KEYS = ("copy_gbps", "memcpy_gbps", "read_gbps", "matmul_gflops")
_COLUMNS = ("gbps", "gflops", "roofline_fraction")
#: byte counts (record's convention), left out of "details"
_BYTE_KEYS = ("bytes", "bytes_read", "bytes_written")


def load(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    benches = data.get("benchmarks")
    if not isinstance(benches, list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return benches


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _baseline(group: list[dict]) -> dict | None:
    """The group's benchmark marked ``baseline: true`` in extra_info, or None."""
    for b in group:
        if b.get("extra_info", {}).get("baseline") is True:
            return b
    return None


def markdown(benches: list[dict]) -> str:
    """The Markdown report: one table per group."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benches:
        groups[b.get("group") or "(no group)"].append(b)
    out = []
    limits = next((b["extra_info"] for b in benches
                   if all(k in b.get("extra_info", {}) for k in ("read_gbps", "matmul_gflops"))),
                  None)
    if limits:
        out.append(f"Machine limits measured in the run: read {limits['read_gbps']} GB/s, "
                   f"copy {limits.get('copy_gbps', '?')} GB/s, "
                   f"matmul {limits['matmul_gflops']} GFLOP/s.\n")
    for name in sorted(groups):
        group = sorted(groups[name], key=lambda b: b["stats"]["mean"])
        base = _baseline(group)
        out.append(f"### {name}\n")
        out.append("| benchmark | mean | median | vs baseline | GB/s | GFLOP/s | roofline "
                   "| details |")
        out.append("|---|---|---|---|---|---|---|---|")
        for b in group:
            info = b.get("extra_info", {})
            s = b["stats"]
            if base is None:
                speed = "n/a"
            else:
                speed = (f"{base['stats']['mean'] / s['mean']:.2f}x" if s["mean"]
                         else f"{math.nan}")
            details = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items()
                                if k not in _LIMIT_KEYS and k not in _COLUMNS
                                and k not in _BYTE_KEYS
                                and isinstance(v, (int, float, str, bool)))
            tag = " (baseline)" if b is base else ""
            out.append(
                f"| `{b['name']}`{tag} | {_fmt_time(s['mean'])} | {_fmt_time(s['median'])} | "
                f"{speed} | {_fmt(info.get('gbps', ''))} | {_fmt(info.get('gflops', ''))} "
                f"| {_fmt(info.get('roofline_fraction', ''))} | {details} |")
        out.append("")
    return "\n".join(out)


def plot(benches: list[dict], path: str) -> None:
    """Roofline figure: GB/s vs bandwidth limit, and GFLOP/s vs min(peak, bw x intensity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moved = [b for b in benches if b.get("extra_info", {}).get("gbps")]
    computed = [b for b in benches
                if b.get("extra_info", {}).get("gflops") and b["extra_info"].get("bytes")]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.28 * len(moved) + 1.5)))
    ax = axes[0]
    if moved:
        names = [b["name"] for b in moved]
        gbps = [b["extra_info"]["gbps"] for b in moved]
        ax.barh(range(len(moved)), gbps, color="tab:blue")
        ax.set_yticks(range(len(moved)), names, fontsize=6)
        read = moved[0]["extra_info"].get("read_gbps")
        copy = moved[0]["extra_info"].get("copy_gbps")
        if read:
            ax.axvline(read, color="tab:red", ls="--", label=f"read limit {read} GB/s")
        if copy:
            ax.axvline(copy, color="tab:orange", ls=":", label=f"copy limit {copy} GB/s")
        ax.set_xlabel("achieved GB/s")
        ax.legend(fontsize=7)
    ax.set_title("bandwidth: achieved vs the machine's limit")
    ax = axes[1]
    if computed:
        info0 = computed[0]["extra_info"]
        peak, bw = info0.get("matmul_gflops"), info0.get("read_gbps")
        ai = [b["extra_info"].get("flops", b["extra_info"]["gflops"] * b["stats"]["mean"] * 1e9)
              / b["extra_info"]["bytes"] for b in computed]
        ax.scatter(ai, [b["extra_info"]["gflops"] for b in computed], s=14)
        for x, b in zip(ai, computed, strict=True):
            ax.annotate(b["name"].replace("test_", ""), (x, b["extra_info"]["gflops"]),
                        fontsize=5)
        if peak and bw:
            lo, hi = min(ai) / 4, max(ai) * 4
            xs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
            ax.plot(xs, [min(peak, bw * x) for x in xs], "r-", label="roofline")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("roofline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="file written by pytest --benchmark-json")
    p.add_argument("--markdown", default=None, help="write the table here (default: stdout)")
    p.add_argument("--plot", default=None, help="write the roofline plot (PNG) here")
    args = p.parse_args(argv)
    benches = load(args.json)
    md = markdown(benches)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    else:
        sys.stdout.write(md + "\n")
    if args.plot:
        plot(benches, args.plot)
    return md


if __name__ == "__main__":
    main()
