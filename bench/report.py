"""RESULTS.md and the plots, from the results dict trex-bench writes to results.json.

    python -m bench.report bench/results      # redraw tables and plots from results.json

The ratios the benchmark exists for:

* transformer forward passes per output token, baseline / T-REX, on 10-digit operands:
  what one compiler pass per answer saves (target: at least 10x);
* saturated answers/s, T-REX / baseline, over gRPC: whether that saving reaches throughput;
* gRPC / engine-only answers/s at the same concurrency and batch knobs: what the gRPC layer
  costs (target: at least 80%).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TREX, BASELINE = "trex", "baseline"
NAMES = {TREX: "T-REX", BASELINE: "baseline"}
PASSES_TARGET = 10.0
GRPC_TARGET = 0.8
PLOTS = ("throughput_vs_concurrency.png", "latency_vs_load.png")


def _f(value, spec: str = ".1f", scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return format(value * scale, spec)


def _name(results: dict, label: str) -> str:
    kind = results["models"][label]["kind"]
    return label if label == kind else f"{label} ({NAMES.get(kind, kind)})"


def _load(p: dict) -> str:
    clients = f"{p['level']:.0f} client" + ("s" if p["level"] != 1 else "")
    if p["loop"] == "closed":
        return clients
    if p["loop"] == "open":
        return f"{p['level']:.0f}/s offered"
    return f"accuracy pass, {clients}"


def _points(results: dict, label: str, mode: str, loop: str | None = None) -> list[dict]:
    points = results["models"][label].get(mode, {}).get("points", [])
    return [p for p in points if loop is None or p["loop"] == loop]


def _by_kind(results: dict, kind: str) -> str | None:
    return next((lb for lb, m in results["models"].items() if m["kind"] == kind), None)


def saturated(results: dict, label: str, mode: str = "grpc") -> dict | None:
    """The closed-loop point with the most answers/s."""
    closed = _points(results, label, mode, "closed")
    return max(closed, key=lambda p: p["answers_per_s"]) if closed else None


def ratios(results: dict) -> list[dict]:
    """[{name, value, target, met, detail}], those the results have the figures for."""
    out = []
    trex, base = _by_kind(results, TREX), _by_kind(results, BASELINE)
    if trex and base:
        groups = {
            lb: {g["group"]: g for g in results["models"][lb].get("grpc", {}).get("groups", [])}
            for lb in (trex, base)
        }
        t10, b10 = groups[trex].get("10"), groups[base].get("10")
        if t10 and b10 and t10["passes_per_token"] and b10["passes_per_token"]:
            value = b10["passes_per_token"] / t10["passes_per_token"]
            out.append(
                {
                    "name": "forward passes per token, baseline / T-REX, 10-digit operands",
                    "value": value,
                    "target": f">= {PASSES_TARGET:.0f}x",
                    "met": value >= PASSES_TARGET,
                    "detail": f"{b10['passes_per_token']:.3f} / {t10['passes_per_token']:.3f}",
                }
            )
        st, sb = saturated(results, trex), saturated(results, base)
        if st and sb and sb["answers_per_s"] > 0:
            out.append(
                {
                    "name": "saturated answers/s over gRPC, T-REX / baseline",
                    "value": st["answers_per_s"] / sb["answers_per_s"],
                    "target": "",
                    "met": None,
                    "detail": f"{st['answers_per_s']:.0f} ({st['level']:.0f} clients) / "
                    f"{sb['answers_per_s']:.0f} ({sb['level']:.0f} clients)",
                }
            )
            out.append(
                {
                    "name": "saturated tokens/s over gRPC, T-REX / baseline",
                    "value": st["tokens_per_s"] / sb["tokens_per_s"],
                    "target": "",
                    "met": None,
                    "detail": f"{st['tokens_per_s']:.0f} / {sb['tokens_per_s']:.0f}",
                }
            )
            if st["server_cpu_s_per_answer"] and sb["server_cpu_s_per_answer"]:
                out.append(
                    {
                        "name": "server CPU per answer at saturation, baseline / T-REX",
                        "value": sb["server_cpu_s_per_answer"] / st["server_cpu_s_per_answer"],
                        "target": "",
                        "met": None,
                        "detail": f"{sb['server_cpu_s_per_answer'] * 1e3:.2f} ms / "
                        f"{st['server_cpu_s_per_answer'] * 1e3:.2f} ms",
                    }
                )
    for label in results["models"]:
        grpc = {p["level"]: p for p in _points(results, label, "grpc", "closed")}
        engine = {p["level"]: p for p in _points(results, label, "engine", "closed")}
        common = sorted(set(grpc) & set(engine))
        if not common:
            continue
        engine_best = max(engine.values(), key=lambda p: p["answers_per_s"])
        top = common[-1]
        g, e = grpc[top], engine[top]
        if e["answers_per_s"] <= 0:
            continue
        value = g["answers_per_s"] / e["answers_per_s"]
        out.append(
            {
                "name": f"{_name(results, label)}: gRPC / engine-only answers/s, {top:.0f} clients",
                "value": value,
                "target": f">= {GRPC_TARGET:.0%}",
                "met": value >= GRPC_TARGET,
                "detail": f"{g['answers_per_s']:.0f} / {e['answers_per_s']:.0f}; mean batch "
                f"compile {_f(g['mean_compile_batch'])} vs {_f(e['mean_compile_batch'])}, "
                f"execute {_f(g['mean_execute_batch'])} vs {_f(e['mean_execute_batch'])}",
            }
        )
        if g["server_cpu_s_per_answer"] and e["server_cpu_s_per_answer"]:
            out.append(
                {
                    "name": f"{_name(results, label)}: CPU per answer, gRPC server process / "
                    f"engine-only process, {top:.0f} clients",
                    "value": g["server_cpu_s_per_answer"] / e["server_cpu_s_per_answer"],
                    "target": "",
                    "met": None,
                    "detail": f"{g['server_cpu_s_per_answer'] * 1e3:.3f} ms / "
                    f"{e['server_cpu_s_per_answer'] * 1e3:.3f} ms (the latter includes "
                    "the load generator)",
                }
            )
        gs = saturated(results, label)
        if gs and engine_best["answers_per_s"] > 0:
            out.append(
                {
                    "name": f"{_name(results, label)}: saturated gRPC / saturated engine-only",
                    "value": gs["answers_per_s"] / engine_best["answers_per_s"],
                    "target": f">= {GRPC_TARGET:.0%}",
                    "met": gs["answers_per_s"] / engine_best["answers_per_s"] >= GRPC_TARGET,
                    "detail": f"{gs['answers_per_s']:.0f} ({gs['level']:.0f} clients) / "
                    f"{engine_best['answers_per_s']:.0f} "
                    f"({engine_best['level']:.0f} clients)",
                }
            )
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    m = results["machine_before"]
    lines = [
        "# trex-bench results",
        "",
        f"Run {results['started']} to {results['finished']}, commit {m['commit']}"
        + (" (with uncommitted changes)" if m["dirty"] else "")
        + f"; {m['cpu_count']} CPUs ({m['cpu'] or 'unknown'}), load average before "
        f"{m['load_average'][0]:.2f}, after {results['machine_after']['load_average'][0]:.2f}"
        + ("; a training run was going on" if m["training_running"] else "")
        + f". onnxruntime {m['onnxruntime']}, grpcio {m['grpcio']}, Python {m['python']}.",
        "",
        (
            f"Server flags, every model and mode: `{' '.join(s['server_flags'])}`. "
            f"{s['problems']} held-out problems (seed {s['seed']}); each load point "
            f"{s['warmup_s']:g} s warm-up then {s['duration_s']:g} s measured; the load "
            f"generator (grpc.aio, {s['channels']} channel) runs in one process beside the server."
        ),
        "",
        "## Throughput and latency",
        "",
        (
            "Closed loop: N clients each sending its next problem when its answer came back. "
            "Open loop: Poisson arrivals, latency from the scheduled arrival. Passes/token: "
            "transformer forward passes per output token (`<end>` included). CPU: the server "
            "process, per answer and in cores busy over the window (engine only: the whole "
            "bench process, load generator included); client CPU: the load generator's "
            "process, which shares the machine with the server."
        ),
        "",
        (
            "| model | via | load | answers/s | tokens/s | p50 ms | p95 ms | p99 ms "
            "| passes/token | CPU ms/answer | CPU cores | client CPU ms/answer | accuracy "
            "| errors | mean batch compile / execute |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, entry in results["models"].items():
        for mode in ("grpc", "engine"):
            for p in entry.get(mode, {}).get("points", []):
                errors = ", ".join(f"{k} {v}" for k, v in sorted(p["errors"].items())) or "0"
                # in-process, the load generator's CPU is already in the process's
                client = p["client_cpu_s_per_answer"] if mode == "grpc" else None
                lines.append(
                    f"| {_name(results, label)} | {'gRPC' if mode == 'grpc' else 'engine only'} "
                    f"| {_load(p)} | {_f(p['answers_per_s'], '.0f')} "
                    f"| {_f(p['tokens_per_s'], '.0f')} | {_f(p['p50_ms'], '.2f')} "
                    f"| {_f(p['p95_ms'], '.2f')} | {_f(p['p99_ms'], '.2f')} "
                    f"| {_f(p['passes_per_token'], '.3f')} "
                    f"| {_f(p['server_cpu_s_per_answer'], '.3f', 1e3)} "
                    f"| {_f(p['server_cores'], '.2f')} "
                    f"| {_f(client, '.3f', 1e3)} "
                    f"| {_f(p['accuracy'], '.2%')} | {errors} "
                    f"| {_f(p['mean_compile_batch'])} / {_f(p['mean_execute_batch'])} |"
                )
    lines += [
        "",
        "## By operand length (accuracy pass: every problem once)",
        "",
        "Grouped by the significant digits of the longer operand.",
        "",
        "| model | digits | answered | accuracy | tokens/answer | passes/token | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, entry in results["models"].items():
        for g in entry.get("grpc", {}).get("groups", []):
            lines.append(
                f"| {_name(results, label)} | {g['group']} | {g['answered']} "
                f"| {_f(g['accuracy'], '.2%')} | {_f(g['tokens_per_answer'], '.2f')} "
                f"| {_f(g['passes_per_token'], '.3f')} | {_f(g['p50_ms'], '.2f')} "
                f"| {_f(g['p99_ms'], '.2f')} |"
            )
    lines += [
        "",
        "## Ratios",
        "",
        "| ratio | value | target | met | figures |",
        "|---|---:|---|---|---|",
    ]
    for r in ratios(results):
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        value = f"{r['value']:.1%}" if "%" in r["target"] else f"{r['value']:.2f}x"
        lines.append(f"| {r['name']} | {value} | {r['target']} | {met} | {r['detail']} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p[:-4]}]({p})" for p in PLOTS]
    lines += profile_markdown(results)
    return "\n".join(lines).rstrip() + "\n"


def profile_markdown(results: dict) -> list[str]:
    """CPU per answer by where it went, from the py-spy points (--profile)."""
    lines = []
    for label, entry in results["models"].items():
        for mode in ("grpc", "engine"):
            prof = entry.get(mode, {}).get("profile")
            if not prof:
                continue
            if not lines:
                lines = ["", "## Where the CPU goes at saturation (py-spy --native, /proc)", ""]
            answered = max(prof["answered"], 1)
            via = "gRPC server process" if mode == "grpc" else "engine-only (bench process)"
            total = sum(t["cpu_s"] for t in prof["threads"])
            raw = Path(prof["file"]).name
            lines += [
                (
                    f"{_name(results, label)}, {via}: {prof['answered']} answers in "
                    f"{prof['window_s']:.1f} s under the profiler, "
                    f"{total / answered * 1e3:.3f} ms CPU per answer; "
                    f"{prof['samples']} samples, raw stacks in `{raw}`."
                ),
                "",
                "| thread | CPU ms/answer | busiest in |",
                "|---|---:|---|",
            ]
            for t in prof["threads"]:
                busy = ", ".join(f"{k} {v:.0%}" for k, v in list(t.get("busy", {}).items())[:4])
                lines.append(f"| {t['name']} | {t['cpu_s'] / answered * 1e3:.3f} | {busy} |")
            lines += ["", "| category | CPU ms/answer | share |", "|---|---:|---:|"]
            for k, v in prof["cpu_by_category"].items():
                lines.append(f"| {k} | {v / answered * 1e3:.3f} | {v / total:.1%} |")
            lines.append("")
    return lines


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(results["models"]):
        colors[label] = palette[i % len(palette)]
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label in results["models"]:
        for mode, style in (("grpc", "-o"), ("engine", "--s")):
            pts = sorted(_points(results, label, mode, "closed"), key=lambda p: p["level"])
            if not pts:
                continue
            x = [p["level"] for p in pts]
            name = f"{_name(results, label)}, {'gRPC' if mode == 'grpc' else 'engine only'}"
            axes[0].plot(
                x, [p["answers_per_s"] for p in pts], style, color=colors[label], label=name
            )
            axes[1].plot(
                x, [p["tokens_per_s"] for p in pts], style, color=colors[label], label=name
            )
    for ax, what in zip(axes, ("answers/s", "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput vs concurrency")
    fig.tight_layout()
    written.append(out / PLOTS[0])
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in results["models"]:
        pts = sorted(_points(results, label, "grpc", "open"), key=lambda p: p["level"])
        pts = [p for p in pts if p["p50_ms"] is not None]
        if not pts:
            continue
        x = [p["level"] for p in pts]
        ax.plot(
            x,
            [p["p50_ms"] for p in pts],
            "-o",
            color=colors[label],
            label=f"{_name(results, label)} p50",
        )
        ax.plot(
            x,
            [p["p99_ms"] for p in pts],
            "--^",
            color=colors[label],
            label=f"{_name(results, label)} p99",
        )
        sat = saturated(results, label)
        if sat:
            ax.axvline(sat["answers_per_s"], color=colors[label], alpha=0.3, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, answers/s (Poisson arrivals; dotted: closed-loop saturation)")
    ax.set_ylabel("latency, ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Latency vs offered load (gRPC)")
    fig.tight_layout()
    written.append(out / PLOTS[1])
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def write(results: dict, out: Path) -> str:
    """Write RESULTS.md and the plots into ``out``; -> the Markdown."""
    text = markdown(results)
    if (out / "PROFILE.md").is_file():
        # written by hand from a --profile run: where the gRPC server's time goes
        text += "\nWhere the time goes, gRPC against the engine alone: [PROFILE.md](PROFILE.md).\n"
    (out / "RESULTS.md").write_text(text)
    plots(results, out)
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "bench/results")
    results = json.loads((out / "results.json").read_text())
    print(write(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
