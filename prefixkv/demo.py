"""The main job: serve a stream of requests with shared prefixes through prefixkv, with prefix
caching off and on, in JAX and in PyTorch, and report what caching bought.

    python -m prefixkv.demo                      # both frameworks (those installed), ~1 min
    python -m prefixkv.demo --frontend torch --device cuda --plot ttft.png
    python -m prefixkv.demo --frontend torch --request-rate 5   # open loop, Poisson 5 req/s

A tiny Llama-style decoder (seeded random weights, identical in both frameworks) runs its
attention through the prefixkv ops (write_kv, paged_attention, shared_prefix_attention,
gather/scatter_blocks for offload); the engine drives the ``paged/`` PrefixCache (prefix
matching per tenant salt, allocation, eviction to a host tier, onboarding). The workload is two
tenants' multi-turn chats over one system prompt plus a few unique prompts, about 90% of the
prompt tokens in shared prefixes. The table per framework shows requests, prompt tokens,
prefix-hit rate, TTFT p50/p95, decode tokens/s, blocks offloaded/onboarded and the speedup;
the generations with caching on are checked to equal those with caching off.

By default the engine runs a closed loop (a request is admitted as a sequence slot frees; TTFT
from admission). ``--request-rate R`` makes it an open loop as vLLM's ``benchmark_serving.py
--request-rate``: requests arrive by a seeded Poisson process at R requests/s (``inf``: all at
once; ``--burstiness B`` as vLLM's: gamma-distributed gaps of the same mean, burstier below 1),
in wall-clock time, none is admitted before its arrival, and TTFT counts from arrival
(queueing included). Caching on and off, and every framework, serve the same arrival times.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from .models import EngineConfig, LlamaConfig, WorkloadConfig, init_weights, make_adapter
from .models.engine import Engine, RunResult
from .models.workload import arrival_times, make_workload, shared_prefix_fraction


def _progress(total: int, desc: str):
    """(update(n_done), close()) of a tqdm bar, or of a plain one-line bar without tqdm; no
    bar when stderr is not a terminal (a log or a pipe would keep every redraw)."""
    if not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr)

        def update(n: int) -> None:
            bar.update(n - bar.n)

        return update, bar.close

    def update_plain(n: int) -> None:
        filled = int(30 * n / max(total, 1))
        sys.stderr.write(f"\r{desc} [{'#' * filled}{'.' * (30 - filled)}] {n}/{total}")
        sys.stderr.flush()

    def close_plain() -> None:
        sys.stderr.write("\r" + " " * (len(desc) + 45) + "\r")
        sys.stderr.flush()

    return update_plain, close_plain


# EngineConfig's fields and the flags that set them: a value EngineConfig refuses is reported
# as a usage error under its flag (a bad --min-token-bucket had hung the engine)
_ENGINE_FLAGS = {"block_size": "--block-size", "num_blocks": "--num-blocks",
                 "host_blocks": "--host-blocks", "max_num_seqs": "--max-num-seqs",
                 "max_num_batched_tokens": "--max-batched-tokens",
                 "min_token_bucket": "--min-token-bucket", "max_model_len": "--max-model-len"}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's configuration from the parsed flags (caching on; the demo toggles it)."""
    return EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                        max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_batched_tokens,
                        max_model_len=args.max_model_len, host_blocks=args.host_blocks,
                        min_token_bucket=args.min_token_bucket,
                        shared_prefix=not args.no_shared_prefix)


# the frameworks --frontend runs beyond numpy (a base dependency): name, extra that brings it
_FRAMEWORKS = {"jax": ("JAX", "prefixkv[jax]"), "torch": ("PyTorch", "prefixkv[torch]")}


def select_frameworks(frontend: str) -> tuple[list[str], list[str]]:
    """(the frameworks ``--frontend`` runs, those it asks for that are not installed), decided
    before any work: a framework found missing at its turn failed the run with a bare
    ModuleNotFoundError, after the frameworks before it had run (``both`` on a torch-only
    install died on jax at once, on a jax-only one after the whole JAX half)."""
    wanted = ["jax", "torch"] if frontend == "both" else [frontend]
    found = [fw for fw in wanted if fw not in _FRAMEWORKS or _has(fw)]
    return found, [fw for fw in wanted if fw not in found]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m prefixkv.demo",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d_model, d_engine, d_work = LlamaConfig(), EngineConfig(), WorkloadConfig()
    p.add_argument("--frontend", choices=("jax", "torch", "both", "numpy"), default="both",
                   help="both: jax and torch, those of them installed")
    p.add_argument("--device", default=None,
                   help="framework device: cpu, gpu/cuda, tpu (default: the framework's)")
    p.add_argument("--requests", type=int, default=None,
                   help="serve only the first N requests of the stream")
    p.add_argument("--seed", type=int, default=0,
                   help="weights, workload and arrival-times seed")
    p.add_argument("--request-rate", type=float, default=None, metavar="R",
                   help="open loop: requests arrive by a Poisson process at R requests/s "
                        "('inf': all at once), TTFT from arrival (default: a closed loop, a "
                        "request admitted as a slot frees, TTFT from admission)")
    p.add_argument("--burstiness", type=float, default=1.0, metavar="B",
                   help="with --request-rate: gamma-distributed gaps of the same mean, B < 1 "
                        "burstier, B > 1 more even (vLLM's --burstiness; default 1: Poisson)")
    p.add_argument("--plot", default=None, help="write TTFT with vs without caching to this PNG")
    p.add_argument("--threads", type=int, default=1 if (os.cpu_count() or 1) <= 4 else None,
                   help="CPU threads per framework (default: 1 on small machines, where "
                        "oversubscribed threads make every figure swing; 0 or, on large "
                        "machines, by default: the framework's own setting)")
    p.add_argument("--compile-cache", default=os.path.join(
        os.path.expanduser("~"), ".cache", "prefixkv", "jax"),
                   help="JAX persistent compilation cache directory ('' to disable)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=d_model.num_layers)
    g.add_argument("--hidden", type=int, default=d_model.hidden_size)
    g.add_argument("--intermediate", type=int, default=d_model.intermediate_size)
    g.add_argument("--q-heads", type=int, default=d_model.num_q_heads)
    g.add_argument("--kv-heads", type=int, default=d_model.num_kv_heads)
    g.add_argument("--head-dim", type=int, default=d_model.head_dim)
    g.add_argument("--vocab", type=int, default=d_model.vocab_size)
    g.add_argument("--dtype", default=d_model.dtype, choices=("float32", "bfloat16", "float16"))
    g.add_argument("--max-model-len", type=int, default=d_model.max_model_len,
                   help="longest prompt + generation (the RoPE table and the engine's limit)")
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=d_engine.block_size)
    g.add_argument("--num-blocks", type=int, default=d_engine.num_blocks,
                   help="device pool blocks (null block included)")
    g.add_argument("--host-blocks", type=int, default=d_engine.host_blocks,
                   help="host tier capacity in blocks (0: no offload)")
    g.add_argument("--max-num-seqs", type=int, default=d_engine.max_num_seqs)
    g.add_argument("--max-batched-tokens", type=int, default=d_engine.max_num_batched_tokens)
    g.add_argument("--min-token-bucket", type=int, default=d_engine.min_token_bucket,
                   help="smallest padded step size (fewer sizes = fewer compiles)")
    g.add_argument("--no-shared-prefix", action="store_true",
                   help="never use shared_prefix_attention (paged_attention only)")
    g = p.add_argument_group("workload")
    g.add_argument("--system-prompt-len", type=int, default=d_work.system_prompt_len)
    g.add_argument("--chats", type=int, default=d_work.chats_per_tenant,
                   help="chats per tenant (two tenants)")
    g.add_argument("--turns", type=int, default=d_work.turns)
    g.add_argument("--unique", type=int, default=d_work.num_unique)
    g.add_argument("--max-new-tokens", type=int, default=d_work.max_new_tokens)
    args = p.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        p.error(f"--requests: expected >= 1, got {args.requests}")
    if args.request_rate is not None and not args.request_rate > 0:
        p.error(f"--request-rate: expected > 0 requests/s (inf: all at once), got "
                f"{args.request_rate}")
    if not 0 < args.burstiness < math.inf:
        p.error(f"--burstiness: expected a finite value > 0 (1: Poisson), got "
                f"{args.burstiness}")
    if args.burstiness != 1.0 and args.request_rate is None:
        p.error("--burstiness: shapes the open loop's arrivals; give --request-rate too")
    # both runs those of jax and torch installed (one at least); a named one must be installed
    args.frameworks, args.skipped = select_frameworks(args.frontend)
    if not args.frameworks:
        names = " or ".join(_FRAMEWORKS[fw][0] for fw in args.skipped)
        extras = " or ".join(f"'{_FRAMEWORKS[fw][1]}'" for fw in args.skipped)
        p.error(f"--frontend {args.frontend} needs {names}: pip install {extras} "
                f"(or --frontend numpy)")
    if args.plot and not _has("matplotlib"):  # else found missing only after every run
        p.error("--plot needs matplotlib: pip install matplotlib (it is in 'prefixkv[bench]')")
    try:
        engine_config(args)
    except (TypeError, ValueError) as e:  # its messages start with the field's name
        field, _, reason = str(e).partition(": ")
        p.error(f"{_ENGINE_FLAGS.get(field, field)}: {reason}")
    return args


def _fmt_row(name: str, off, on, fmt: str) -> str:
    return f"  {name:<22}{format(off, fmt):>14}{format(on, fmt):>14}"


def format_table(framework: str, device: str, off: RunResult, on: RunResult) -> str:
    same = off.outputs() == on.outputs()
    dlogit = max((float(np.max(np.abs(a.final_logits - b.final_logits)))
                  for a, b in zip(off.requests, on.requests, strict=True)), default=0.0)
    lines = [f"== {framework} ({device}) ==",
             f"  {'':<22}{'caching off':>14}{'caching on':>14}",
             _fmt_row("requests", len(off.requests), len(on.requests), "d"),
             _fmt_row("prompt tokens", off.prompt_tokens, on.prompt_tokens, "d"),
             _fmt_row("prefix-hit rate", off.hit_rate, on.hit_rate, ".1%"),
             _fmt_row("TTFT p50 (ms)", 1e3 * off.ttft(50), 1e3 * on.ttft(50), ".1f"),
             _fmt_row("TTFT p95 (ms)", 1e3 * off.ttft(95), 1e3 * on.ttft(95), ".1f"),
             _fmt_row("decode tokens/s", off.decode_tokens_per_s, on.decode_tokens_per_s, ".0f"),
             _fmt_row("blocks offloaded", off.blocks_offloaded, on.blocks_offloaded, "d"),
             _fmt_row("blocks onboarded", off.blocks_onboarded, on.blocks_onboarded, "d"),
             _fmt_row("shared-prefix steps", off.shared_prefix_steps, on.shared_prefix_steps,
                      "d"),
             _fmt_row("wall time (s)", off.wall_s, on.wall_s, ".2f"),
             *([_fmt_row("idle, none running (s)", off.idle_s, on.idle_s, ".2f")]
               if off.open_loop else []),
             f"  caching speedup: TTFT p50 {off.ttft(50) / on.ttft(50):.1f}x, "
             f"p95 {off.ttft(95) / on.ttft(95):.1f}x, wall {off.wall_s / on.wall_s:.1f}x",
             f"  generations identical with caching on and off: {'yes' if same else 'NO'} "
             f"(max |logit diff| of the last step {dlogit:.1e})"]
    return "\n".join(lines)


def plot_ttft(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (fw, (off, on)) in zip(axes[0], results.items(), strict=True):
        ids = [r.request_id for r in off.requests]
        ax.plot(ids, [1e3 * r.ttft_s for r in off.requests], "o-", ms=3, label="caching off")
        ax.plot(ids, [1e3 * r.ttft_s for r in on.requests], "o-", ms=3, label="caching on")
        ax.set_yscale("log")
        ax.set_xlabel("request (stream order)")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"{fw}: TTFT p50 {1e3 * off.ttft(50):.1f} -> {1e3 * on.ttft(50):.1f} ms "
                     f"({off.ttft(50) / on.ttft(50):.1f}x)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _set_threads(n: int | None, compile_cache: str) -> None:
    """One thread per framework when asked (set before the frameworks start their pools)."""
    if n:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, str(n))
        if n == 1 and "jax" not in sys.modules:
            os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                               "intra_op_parallelism_threads=1")
        if "torch" in sys.modules or _has("torch"):
            import torch

            torch.set_num_threads(n)
    if compile_cache and _has("jax"):
        import jax

        jax.config.update("jax_compilation_cache_dir", compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv=None) -> dict:
    """Run the demo; returns ``{framework: (result caching off, result caching on)}``."""
    args = parse_args(argv)
    _set_threads(args.threads, args.compile_cache if "jax" in args.frameworks else "")
    model = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                        num_layers=args.layers, num_q_heads=args.q_heads,
                        num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                        intermediate_size=args.intermediate, dtype=args.dtype,
                        max_model_len=args.max_model_len)
    work = WorkloadConfig(system_prompt_len=args.system_prompt_len,
                          chats_per_tenant=args.chats, turns=args.turns,
                          num_unique=args.unique, max_new_tokens=args.max_new_tokens,
                          seed=args.seed)
    engine_cfg = engine_config(args)
    requests = make_workload(work, model.vocab_size, args.requests)
    weights = init_weights(model, args.seed)
    n_prompt = sum(len(r.prompt) for r in requests)
    arrivals = None
    if args.request_rate is not None:
        arrivals = arrival_times(len(requests), args.request_rate, args.seed,
                                 args.burstiness)
    print(f"prefixkv demo: {len(requests)} requests, {n_prompt} prompt tokens "
          f"({shared_prefix_fraction(requests):.1%} in prefixes shared with an earlier "
          f"request), {len(work.tenants)} tenants with their own salts")
    print(f"model: {model.num_layers} layers, hidden {model.hidden_size}, "
          f"{model.num_q_heads}/{model.num_kv_heads} q/kv heads x {model.head_dim}, "
          f"{model.dtype}; pool {engine_cfg.num_blocks} blocks x {engine_cfg.block_size} "
          f"tokens, host tier {engine_cfg.host_blocks} blocks; "
          f"threads {args.threads or 'as the framework sets them'}")
    if arrivals is None:
        print("arrivals: closed loop (a request admitted as a sequence slot frees; TTFT from "
              "admission)")
    elif math.isinf(args.request_rate):
        print("arrivals: open loop, all at once (TTFT from arrival at 0, queueing included)")
    else:
        kind = ("Poisson" if args.burstiness == 1.0 else
                f"gamma gaps (burstiness {args.burstiness:g})")
        print(f"arrivals: open loop, {kind} at {args.request_rate:g} requests/s (seed "
              f"{args.seed}; last at {arrivals[-1]:.2f} s; TTFT from arrival, queueing "
              f"included)")
    for fw in args.skipped:  # only with both: a framework asked for by name is installed
        name, extra = _FRAMEWORKS[fw]
        print(f"{name} is not installed, so --frontend both runs {args.frameworks[0]} only "
              f"(pip install '{extra}' to run it too)")
    results = {}
    for fw in args.frameworks:
        adapter = make_adapter(fw, model, weights, num_blocks=engine_cfg.num_blocks,
                               block_size=engine_cfg.block_size, device=args.device)
        device = str(getattr(adapter, "device", "cpu"))
        pair = []
        for caching in (False, True):
            engine = Engine(adapter, engine_cfg.replace(enable_caching=caching))
            t0 = time.perf_counter()
            warm = engine.warmup()
            label = f"{fw} caching {'on' if caching else 'off'}"
            update, close = _progress(len(requests), label)
            try:
                res = engine.run(requests, arrivals=arrivals, progress=update)
            finally:
                close()
            res.warmup_s = warm
            print(f"  {label}: {time.perf_counter() - t0:.1f}s (compile/warm-up {warm:.1f}s)",
                  file=sys.stderr)
            pair.append(res)
        results[fw] = tuple(pair)
        print(format_table(fw, device, *pair))
        sys.stdout.flush()
    if args.plot:
        plot_ttft(results, args.plot)
        print(f"TTFT plot written to {args.plot}")
    return results


if __name__ == "__main__":
    main()
