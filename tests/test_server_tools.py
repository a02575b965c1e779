"""The reference client (`python -m app.client`) and the load benchmark, against a scripted-engine server."""

import importlib.util
from pathlib import Path

import pytest

from app import client as C
from app.config import ServerConfig
from app.engine_backend import EngineBackend
from server_fakes import FakeEngine, ServerThread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    cfg = ServerConfig(port=0, log_level="warning", api_key="tok")
    srv = ServerThread(cfg, EngineBackend(cfg, FakeEngine(0.005))).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("line,col,want", [
    (1, 1, ("", "ab\ncd\n")), (1, 2, ("a", "b\ncd\n")), (2, 3, ("ab\ncd", "\n")), (2, 99, ("ab\ncd", "\n")),
    (3, 1, ("ab\ncd\n", "")),
])
def test_split_at(line, col, want):
    assert C.split_at("ab\ncd\n", line, col) == want


def test_split_at_rejects_positions_outside_the_file():
    with pytest.raises(ValueError):
        C.split_at("ab\n", 5, 1)


def test_client_complete_and_chat(server, tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text("def f(x):\n    \n")
    rc = C.main(["--url", server.ws_url, "--token", "tok", "complete", str(f), "--line", "2", "--col", "5",
                 "--single-line"])
    out = capsys.readouterr()
    assert rc == 0 and out.out == "alpha beta gamma" and "[stop," in out.err
    assert C.main(["--url", server.ws_url, "--token", "tok", "--max-tokens", "2", "chat", "hi"]) == 0
    assert capsys.readouterr().out == "alpha beta"
    assert C.main(["--url", server.ws_url, "--token", "tok", "--max-tokens", "100000", "chat", "hi"]) == 1
    assert "invalid_request" in capsys.readouterr().err
    assert C.main(["--url", server.ws_url, "--token", "wrong", "chat", "hi"]) == 2
    assert "401" in capsys.readouterr().err


def test_load_benchmark_runs_against_a_server(server, monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("load_completions", ROOT / "bench" / "load_completions.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("DOMINO_API_KEY", "tok")
    out = tmp_path / "r.json"
    assert bench.main(["--url", server.ws_url, "--clients", "1,3", "--methods", "ar,domino", "--requests", "2",
                       "--max-tokens", "8", "--voice-turns", "2", "--json", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    cells = report["cells"]
    assert [(m["method"], m["voice_turns"]) for m in report["mixed"]] == [("ar", 2), ("domino", 2)]
    assert all(m["first_sentence_loaded_p50_ms"] > 0 and m["completions_during"] > 0 for m in report["mixed"])
    assert [(c["method"], c["clients"], c["requests"], c["errors"], c["passes"]) for c in cells] == [  # the same work
        ("ar", 1, 12, 0, 2), ("ar", 3, 12, 0, 2), ("domino", 1, 12, 0, 2), ("domino", 3, 12, 0, 2)]
    for s, (one, three) in zip(report["scaling"], (cells[:2], cells[2:])):  # over both passes, and each pass's own
        assert (s["method"], s["clients"], s["vs_clients"]) == (one["method"], 3, 1)
        assert s["ratio"] == three["completions_per_s"] / one["completions_per_s"] and len(s["pass_ratios"]) == 2
    assert all(c["ttft_p50_ms"] <= c["total_p95_ms"] and c["tokens_per_s"] > 0 for c in cells)
    assert all(c["mean_batch"] >= 1 for c in cells) and report["max_batch"] >= 3  # 3 clients shared rounds
    assert cells[2]["mean_tau"] is not None
