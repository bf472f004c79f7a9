"""trex-client as a user runs it, against the shared server subprocess."""

from __future__ import annotations

import subprocess
import sys

from tests.service.conftest import REPO, free_port


def run_client(target: str, *args: str, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "service.client", "--target", target, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )


def test_answers_come_out_in_input_order(server, reference):
    problems = [f"{i * 7919}+{i * 104729}=" for i in range(100)]  # more than --concurrency
    out = run_client(server.target, stdin="\n".join(problems) + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == reference.solve(problems)


def test_a_refused_problem_keeps_lines_aligned_and_fails_the_exit_status(
    server, reference, tmp_path
):
    path = tmp_path / "problems.txt"
    path.write_text("1+2=\n1+two=\n3+4=\n")
    out = run_client(server.target, "--file", str(path))
    assert out.returncode == 1
    first, third = reference.solve(["1+2=", "3+4="])
    assert out.stdout.splitlines() == [first, "", third]
    assert out.stderr.startswith("line 2: '1+two=': INVALID_ARGUMENT: invalid problem")


def test_stats_show_the_servers_figures(server):
    out = run_client(server.target, "--stats", "7669+10132=")
    assert out.returncode == 0, out.stderr
    _answer, stats = out.stdout.rstrip("\n").split("\t")
    figures = dict(field.split("=", 1) for field in stats.split())
    assert figures["compiler_passes"] == "1"
    assert figures["tokens"] == figures["executor_steps"]
    assert float(figures["passes_per_token"]) == round(1 / int(figures["tokens"]), 3)
    assert float(figures["compile_ms"]) > 0


def test_stream_prints_the_answer_as_it_is_emitted(server, reference):
    out = run_client(server.target, "--stream", "9999999999+1=")
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference.solve(["9999999999+1="])[0] + "\n"


def test_unreachable_server_fails_every_problem():
    out = run_client(f"127.0.0.1:{free_port()}", "--timeout", "5", "1+2=", "3+4=")
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["", ""]
    assert out.stderr.count("UNAVAILABLE") == 2


def test_an_unreadable_problem_file_is_a_clear_error(tmp_path):
    out = run_client(f"127.0.0.1:{free_port()}", "--file", str(tmp_path / "missing.txt"))
    assert out.returncode != 0
    assert "cannot read" in out.stderr and "missing.txt" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_problem_starting_with_a_sign_is_refused_by_the_server(server):
    out = run_client(server.target, "--", "-1+2=")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr
