"""trex-bench end to end at a tiny size, and its load loops against a fake solver.

The end-to-end test serves the shipped exports when both models/onnx and
models/onnx-baseline exist, else this session's exports of a T-REX and a baseline
checkpoint (tests/conftest.py). It checks what the benchmark writes, not how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench import cli
from bench.load import OK, SHED, PointResult, Reply, Snapshot, clock, closed_loop, open_loop
from bench.problems import BenchProblem, group_of
from bench.report import BASELINE
from bench.stats import metrics_passes_per_token, summarize

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {"trex": REPO / "models" / "onnx", "baseline": REPO / "models" / "onnx-baseline"}


@pytest.fixture(scope="module")
def exports(request) -> dict[str, Path]:
    if all((p / "manifest.json").is_file() for p in SHIPPED.values()):
        return dict(SHIPPED)
    return {
        "trex": request.getfixturevalue("onnx_model_dir"),
        "baseline": request.getfixturevalue("baseline_onnx_dir"),
    }


def test_tiny_run_writes_sane_results(exports, tmp_path):
    out = tmp_path / "results"
    argv = ["--quick", "--out", str(out), "--duration", "1", "--warmup", "0.2"]
    argv += ["--problems", "60", "--concurrency", "1,4", "--load-fractions", "0.5"]
    for label, path in exports.items():
        argv += ["--model", f"{label}={path}"]
    assert cli.main(argv) == 0

    text = (out / "RESULTS.md").read_text()
    assert "| model | via | load | answers/s |" in text
    assert "## By operand length" in text
    for png in ("throughput_vs_concurrency.png", "latency_vs_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == set(exports)
    for entry in results["models"].values():
        points = entry["grpc"]["points"] + entry["engine"]["points"]
        loops = {(p["mode"], p["loop"]) for p in points}
        assert loops == {
            ("grpc", "closed"),
            ("grpc", "open"),
            ("grpc", "accuracy"),
            ("engine", "closed"),
        }
        for p in points:
            assert p["answered"] > 0, p
            assert p["answers_per_s"] > 0 and p["tokens_per_s"] >= p["answers_per_s"]
            assert 0 < p["passes_per_token"] <= 1
            assert "accuracy" in p and 0 <= p["accuracy"] <= 1
            assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
            assert p["server_cpu_s_per_answer"] > 0
            # the server's counters say the same as the responses
            assert p["metrics_passes_per_token"] == pytest.approx(p["passes_per_token"], rel=0.25)
        if entry["kind"] == BASELINE:
            assert all(p["passes_per_token"] == 1 for p in points)
        accuracy_pass = next(p for p in points if p["loop"] == "accuracy")
        assert accuracy_pass["answered"] == results["settings"]["problems"]
        groups = {g["group"]: g for g in entry["grpc"]["groups"]}
        assert {"10", "all"} <= set(groups)
        assert groups["all"]["answered"] == accuracy_pass["answered"]
        assert entry["grpc"]["server_exit"] == 0


# --- the loops, against a fake solver ---


class FakeSolver:
    """Answers every problem correctly after ``delay_s``, with T-REX's work per answer."""

    def __init__(self, problems: list[BenchProblem], delay_s: float):
        self.answers = {p.text: p.answer for p in problems}
        self.delay_s = delay_s
        self.in_flight = self.most_in_flight = 0

    async def solve(self, problem: str) -> Reply:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        answer = self.answers[problem]
        return Reply(OK, answer, len(answer) + 1, 1, len(answer) + 1)


PROBLEMS = [BenchProblem(f"{i}+1=", str(i + 1), len(str(i))) for i in range(50)]


def _now_probe():
    async def probe():
        return Snapshot(clock(), 0.0, 0.0, {})

    return probe


def test_closed_loop_keeps_n_in_flight_and_counts_only_the_window():
    solver = FakeSolver(PROBLEMS, 0.01)
    point = asyncio.run(
        closed_loop(
            solver,
            PROBLEMS,
            4,
            probe=_now_probe(),
            warmup_s=0.1,
            duration_s=0.3,
            max_requests=10_000,
        )
    )
    assert solver.most_in_flight == 4
    counted = point.finished_in_window()
    assert 0 < len(counted) < len(point.outcomes)  # warm-up requests are not counted
    assert all(point.before.at_s <= o.done_s <= point.after.at_s for o in counted)
    # 4 clients, 10 ms per answer: about 400/s
    assert 150 < len(counted) / point.window_s < 500
    row = summarize(point, PROBLEMS)
    assert row["accuracy"] == 1.0
    assert row["p50_ms"] >= 10


def test_closed_loop_without_cycling_solves_each_problem_once():
    solver = FakeSolver(PROBLEMS, 0.001)
    point = asyncio.run(
        closed_loop(
            solver,
            PROBLEMS,
            8,
            probe=_now_probe(),
            warmup_s=0,
            duration_s=30,
            max_requests=len(PROBLEMS),
            cycle=False,
            loop="accuracy",
        )
    )
    assert sorted(o.index for o in point.timed()) == list(range(len(PROBLEMS)))


def test_open_loop_sheds_beyond_max_in_flight_and_times_from_arrival():
    solver = FakeSolver(PROBLEMS, 0.2)  # 2000/s offered x 0.2 s >> 5 in flight
    point = asyncio.run(
        open_loop(
            solver,
            PROBLEMS,
            2000,
            probe=_now_probe(),
            warmup_s=0.05,
            duration_s=0.2,
            max_requests=10_000,
            max_in_flight=5,
            seed=1,
        )
    )
    assert solver.most_in_flight <= 5
    assert point.shed > 0
    codes = {o.reply.code for o in point.timed()}
    assert codes <= {OK, SHED} and SHED in codes
    row = summarize(point, PROBLEMS)
    assert row["errors"][SHED] == point.shed
    assert row["p50_ms"] >= 200


def test_passes_per_token_from_the_server_counters():
    def snap(passes, tokens):
        return Snapshot(
            0.0,
            0.0,
            0.0,
            {
                ("trex_compiler_forward_passes_total", ()): passes,
                ("trex_output_tokens_total", ()): tokens,
            },
        )

    point = PointResult("closed", 1, [], snap(5, 50), snap(15, 170))
    assert metrics_passes_per_token(point) == pytest.approx(10 / 120)


def test_groups_put_ten_digit_operands_apart():
    assert [group_of(d) for d in (1, 3, 4, 9, 10)] == ["1-3", "1-3", "4-6", "7-9", "10"]


def test_profile_splits_thread_cpu_by_where_the_samples_were(tmp_path):
    from bench.profile import SYSCALLS, WAITING, summarise

    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (11): MainThread;run (asyncio/base_events.py:600);epoll_wait (libc.so.6) 4\n"
        "thread (11): MainThread;uv__io_poll (linux.c:1546);epoll_pwait (libc.so.6) 1\n"
        "thread (11): MainThread;_run (asyncio/events.py:80);write (libc.so.6) 3\n"
        "thread (11): MainThread;schedule (service/scheduler.py:200) 1\n"
        "thread (12): trex-runtime_0;run (onnxruntime/capi/x.py:220);0x7f00 (libc.so.6) 6\n"
        "thread (12): trex-runtime_0;_worker (concurrent/futures/thread.py:81);"
        "_queue_SimpleQueue_get_impl (_queuemodule.c);0x7f01 (libc.so.6) 4\n"
    )
    before = {11: ("python", 1.0), 12: ("python", 2.0), 13: ("event_engine", 0.0)}
    after = {11: ("python", 1.4), 12: ("python", 2.6), 13: ("event_engine", 0.1)}
    s = summarise(raw, before, after)

    threads = {t["name"]: t for t in s["threads"]}
    assert threads["MainThread"]["cpu_s"] == pytest.approx(0.4)
    # waiting samples are left out of where the CPU went
    assert threads["MainThread"]["busy"] == {SYSCALLS: 0.75, "service/scheduler.py": 0.25}
    assert threads["trex-runtime_0"]["busy"] == {"onnxruntime": 1.0}
    assert threads["trex-runtime_0"]["samples"] == 10
    cpu = s["cpu_by_category"]
    assert cpu["onnxruntime"] == pytest.approx(0.6)
    assert cpu[SYSCALLS] == pytest.approx(0.3)
    assert cpu["thread event_engine (not sampled)"] == pytest.approx(0.1)
    assert WAITING not in cpu
