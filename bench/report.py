"""Turn a pytest-benchmark ``--benchmark-json`` file into a Markdown table and a roofline plot.

    .venv/bin/pytest bench/ --benchmark-only --benchmark-json out.json
    .venv/bin/python bench/report.py out.json --markdown out.md --plot roofline.png

The input may also be the JSON-lines file bench/conftest.py streams when
``PREFIXKV_BENCH_JSONL`` is set (bench/run_device.sh's ``bench_figures.jsonl``: one
``{"test", "group", "outcome", "extra_info", "mean_s", "min_s", "rounds"}`` object a benchmark,
written as each finishes); there a test listed twice counts once, its last line, a line
without times (not timed, or failed before timing) is left out, and the median column shows
the min (the stream has no median).

Failed tests: bench/conftest.py marks a benchmark whose test failed ``failed: true`` in
extra_info (the stream also gives its ``outcome``). Many tests check their op's result after
timing, so a wrong op still has times: its row stays in the table, named FAILED, with no
speedup, it is never a group's baseline, and the report lists the failed tests at the top.

The table has one row per benchmark, grouped as pytest-benchmark grouped them: mean and median
time, the speedup over the group's baseline (the benchmark whose ``extra_info`` says
``baseline: true``, what a user would write without prefixkv; where several are marked, e.g.
two ways a user could write it, the fastest that passed, so no speedup is overstated, the
others tagged "also a baseline"; "n/a" in a group with none marked: no guessing, and "n/a
(baseline failed)" where every marked one failed), GB/s, GFLOP/s and the roofline fraction
that ``bench/conftest.py: record`` put in ``extra_info``, plus any other scalar extra_info.
The speedup compares the device clock when every benchmark of the group recorded one
(``kernel_s`` or ``seconds_per_call`` in extra_info: CUDA-event or queued-call seconds per
call, the clock the GPU groups' GB/s use), else pytest-benchmark's host-timed means; each
group names its clock.

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


def _from_jsonl_row(row: dict) -> dict:
    """A streamed row (bench/conftest.py:_stream_figures) as a pytest-benchmark entry; a row
    whose outcome is "failed" is marked failed in extra_info as in pytest-benchmark's JSON."""
    test = row["test"]
    info = dict(row.get("extra_info") or {})
    if row.get("outcome") == "failed":
        info["failed"] = True
    return {"name": test.rsplit("::", 1)[-1], "fullname": test, "group": row.get("group"),
            "extra_info": info,
            "stats": {"mean": row["mean_s"], "min": row.get("min_s"),
                      "rounds": row.get("rounds")}}


def load_jsonl(path: str, text: str) -> list[dict]:
    """The rows of a PREFIXKV_BENCH_JSONL file, last line per test, timed rows only."""
    rows: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # a line cut off by a killed run: the rest stand
            print(f"{path}:{n}: skipped, not JSON ({e.msg})", file=sys.stderr)
            continue
        if not isinstance(row, dict) or "test" not in row:
            raise ValueError(f"{path}:{n}: expected a streamed benchmark row with a 'test' key")
        rows[row["test"]] = row
    return [_from_jsonl_row(r) for r in rows.values() if r.get("mean_s") is not None]


def load(path: str) -> list[dict]:
    """Benchmarks of a pytest-benchmark JSON file or of a streamed JSON-lines file."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # more than one JSON value: JSON lines
    if isinstance(data, dict) and "test" in data:  # a JSON-lines file of one row
        data = None
    if data is None:
        return load_jsonl(path, text)
    benches = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benches, list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list) "
                         "nor streamed JSON lines")
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


def _failed(b: dict) -> bool:
    """Whether the benchmark's test failed (bench/conftest.py's mark)."""
    return b.get("extra_info", {}).get("failed") is True


def _is_baseline(b: dict) -> bool:
    return b.get("extra_info", {}).get("baseline") is True


def _baseline(group: list[dict]) -> dict | None:
    """The first benchmark of ``group`` (sorted fastest first) marked ``baseline: true`` in
    extra_info whose test passed, or None: a failed one's times measure a wrong result."""
    for b in group:
        if _is_baseline(b) and not _failed(b):
            return b
    return None


#: extra_info keys of a device clock's seconds per call, in order of preference
_DEVICE_CLOCKS = ("kernel_s", "seconds_per_call")


def _clock(group: list[dict]) -> tuple[str | None, dict]:
    """(extra_info key, {id(bench): seconds}) of the device clock every benchmark of the group
    recorded, or (None, host means)."""
    for key in _DEVICE_CLOCKS:
        vals = [b.get("extra_info", {}).get(key) for b in group]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for v in vals):
            return key, {id(b): float(v) for b, v in zip(group, vals, strict=True)}
    return None, {id(b): b["stats"]["mean"] for b in group}


def markdown(benches: list[dict]) -> str:
    """The Markdown report: one table per group."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benches:
        groups[b.get("group") or "(no group)"].append(b)
    out = []
    failed = [b.get("fullname") or b["name"] for b in benches if _failed(b)]
    if failed:
        out.append(f"**{len(failed)} benchmark(s) FAILED** (their result checks; times shown, "
                   "no speedup): " + ", ".join(f"`{n}`" for n in failed) + "\n")
    limits = next((b["extra_info"] for b in benches
                   if all(k in b.get("extra_info", {}) for k in ("read_gbps", "matmul_gflops"))),
                  None)
    if limits:
        out.append(f"Machine limits measured in the run: read {limits['read_gbps']} GB/s, "
                   f"copy {limits.get('copy_gbps', '?')} GB/s, "
                   f"matmul {limits['matmul_gflops']} GFLOP/s.\n")
    for name in sorted(groups):
        key, clock = _clock(groups[name])
        group = sorted(groups[name], key=lambda b: clock[id(b)])
        base = _baseline(group)
        out.append(f"### {name}\n")
        out.append(f"vs baseline by {key} (device time per call, extra_info)\n" if key
                   else "vs baseline by the host-timed mean\n")
        out.append("| benchmark | mean | median | vs baseline | GB/s | GFLOP/s | roofline "
                   "| details |")
        out.append("|---|---|---|---|---|---|---|---|")
        base_failed = base is None and any(_is_baseline(b) for b in group)
        for b in group:
            info = b.get("extra_info", {})
            s = b["stats"]
            if _failed(b):
                speed = "FAILED"
            elif base is None:
                speed = "n/a (baseline failed)" if base_failed else "n/a"
            else:
                t = clock[id(b)]
                speed = f"{clock[id(base)] / t:.2f}x" if t else f"{math.nan}"
            details = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items()
                                if k not in _LIMIT_KEYS and k not in _COLUMNS
                                and k not in _BYTE_KEYS
                                and isinstance(v, (int, float, str, bool)))
            tag = (" (baseline)" if b is base
                   else " (also a baseline)" if _is_baseline(b) and not _failed(b) else "")
            if _failed(b):
                tag = " **FAILED**" + (" (baseline)" if _is_baseline(b) else "")
            median = (_fmt_time(s["median"]) if s.get("median") is not None
                      else f"min {_fmt_time(s['min'])}" if s.get("min") is not None else "n/a")
            out.append(
                f"| `{b['name']}`{tag} | {_fmt_time(s['mean'])} | {median} | "
                f"{speed} | {_fmt(info.get('gbps', ''))} | {_fmt(info.get('gflops', ''))} "
                f"| {_fmt(info.get('roofline_fraction', ''))} | {details} |")
        out.append("")
    return "\n".join(out)


def plot(benches: list[dict], path: str) -> None:
    """Roofline figure: GB/s vs bandwidth limit, and GFLOP/s vs min(peak, bw x intensity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in benches if not _failed(b)]  # their figures measure a wrong result
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
    for b in benches:
        if _failed(b):
            print(f"{args.json}: {b.get('fullname') or b['name']} FAILED: flagged in the "
                  "table, never a baseline", file=sys.stderr)
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
