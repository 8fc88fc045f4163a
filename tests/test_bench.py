"""The bench scripts run end to end in their short modes, so they cannot rot: real servers, real models, real files."""

from __future__ import annotations

import json
import math

import pytest

from bench import adapters, constrained, gpu, load, metrics_cost, model7b, preprocess, run_cpu
from bench.report import markdown_table, percentile


def test_percentile_and_markdown_table():
    assert percentile([3, 1, 2], 50) == 2 and percentile([1, 2], 99) == pytest.approx(1.99)
    assert math.isnan(percentile([], 50))
    table = markdown_table([{"a": 1.234, "b": None}, {"a": float("nan"), "b": "x"}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.2 | - |", "| - | x |"]


def test_preprocess_reports_time_and_pixel_difference(tmp_path, capsys):
    assert preprocess.main(["--size", "900x600", "--repeats", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "preprocess.json").read_text())
    rows = {r["format"]: r for r in data["results"]}
    assert set(rows) == {"PNG", "JPEG"}
    for row in rows.values():
        assert row["fast_p50_ms"] > 0 and row["reference_p50_ms"] > 0
        assert row["max_abs_diff_levels"] <= 40 and row["mean_abs_diff_levels"] <= 0.5
        assert row["encode_fast_path"] is True
        assert row["processor_encode_p50_ms"] > 0 and row["serve_encode_p50_ms"] > 0 and row["server_total_p50_ms"] > 0
    assert "| PNG | 900x600 |" in (tmp_path / "preprocess.md").read_text()
    assert "bytes to model inputs" in (tmp_path / "preprocess.md").read_text()
    assert "fast to pixel_values" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["http://example.com:8080"], ["https://127.0.0.1:8080"],
                                  ["http://127.0.0.1:8080", "--concurrency", "0,4"],
                                  ["http://127.0.0.1:8080", "--requests", "0"]])
def test_load_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        load.main(argv)
    assert e.value.code == 2


def test_load_counts_errors_from_a_dead_server():
    # Nothing listens on this port: every request fails fast and is counted, nothing hangs.
    port = run_cpu.free_port()
    result = load.run_level(f"http://127.0.0.1:{port}", [b"{}"], concurrency=2, requests=3, timeout_s=2)
    summary = result.summary()
    assert summary["requests"] == 3 and summary["ok"] == 0 and summary["errors"] == 3
    assert summary["req_per_s"] == 0 and summary["ping_failures"] >= 0


def test_adapters_bench_sends_the_same_traffic_to_the_base_and_to_adapters(tmp_path):
    assert adapters.main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "adapters.json").read_text())
    [run] = data["rounds"]
    assert set(run) == {"base", "one adapter", "4 adapters"}
    assert all(r["ok"] == 8 and r["errors"] == 0 for rows in run.values() for r in rows)
    assert [r["concurrency"] for r in data["summary"]] == [1, 4]
    assert all(row["4 adapters / base"] > 0 and row["base req/s"] > 0 for row in data["summary"])
    bodies = [json.loads(b) for b in adapters.bodies(adapters.ADAPTERS, 2, images=2)]
    assert [b.get("adapter") for b in bodies] == list(adapters.ADAPTERS)  # request i on adapter i mod 4


def test_run_cpu_sweeps_sequential_and_batched_servers(tiny_artifact, tmp_path):
    assert run_cpu.main(["--tiny", "--model-dir", tiny_artifact, "--rounds", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu_compare.json").read_text())
    assert len(data["rounds"]) == len(data["comparisons"]) == 2
    for run in data["rounds"]:
        for name in ("sequential", "batched"):
            levels = run[name]
            assert [r["concurrency"] for r in levels] == [1, 4]
            for r in levels:
                assert r["ok"] == 8 and r["errors"] == 0 and r["req_per_s"] > 0
                assert r["mean_completion_tokens"] <= 2 and r["latency_p99_ms"] >= r["latency_p50_ms"] > 0
                assert r["ping_p50_ms"] > 0 and r["peak_rss_mib"] > 50  # the server process, sampled from /proc
    assert [r["concurrency"] for r in data["summary"]] == [1, 4]
    for level, row in enumerate(data["summary"]):
        speedups = sorted(c[level]["speedup"] for c in data["comparisons"])
        assert row["speedup"] == pytest.approx(sum(speedups) / 2)  # the median of two rounds
        assert row["speedups"].count(" ") == 1
    assert "Batched vs sequential, median of 2 alternating rounds" in (tmp_path / "cpu_compare.md").read_text()


def test_constrained_bench_compares_equal_token_counts(tiny_artifact, tmp_path):
    assert constrained.main(["--tiny", "--model-dir", tiny_artifact, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "constrained.json").read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        # no EOS, a schema no run completes: both sides decode the whole budget, so tokens/s compare per token
        assert row["tokens"] == f"{4 * row['batch']} / {4 * row['batch']}"
        assert row["plain_tok_s"] > 0 and row["constrained_tok_s"] > 0 and row["ratio"] > 0
    assert data["compile_ms"] > data["cached_ms"] >= 0


def test_metrics_cost_alternates_runs_with_and_without_a_scraper(tiny_artifact, tmp_path):
    assert metrics_cost.main(["--tiny", "--model-dir", tiny_artifact, "--scrape-every-ms", "20",
                              "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "metrics_cost.json").read_text())
    [row] = data["summary"]
    assert row["concurrency"] == 4 and row["errors"] == 0 and row["ratio"] > 0 and row["ratios"].count(" ") == 1
    assert row["scrapes"] >= 2 and row["scrape_p99_ms"] >= row["scrape_p50_ms"] > 0
    assert row["with_cpu_ms_per_request"] > 0 and row["without_cpu_ms_per_request"] > 0  # the server's, from /proc
    for pair in data["runs"]["4"]:
        assert pair["with"]["ok"] == pair["without"]["ok"] == 24
        assert pair["with"]["scrapes"] >= 1 and "scrapes" not in pair["without"]
    idle = data["idle"]
    assert idle["samples"] > 100 and idle["metrics_cpu_ms"] >= 0 and idle["ping_cpu_ms"] >= 0
    assert "a scrape every 20 ms" in (tmp_path / "metrics_cost.md").read_text()


def test_gpu_script_tiny_mode_runs_every_measurement(tmp_path):
    assert gpu.main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["model"] == "tiny" and data["new_tokens"] == 4
    assert data["accel_describe"].startswith("on ") and data["eager_describe"].startswith("off")
    assert data["ttft_p50_ms"] > 0 and data["eager_ttft_p50_ms"] > 0 and data["eager_end_to_end_tok_s"] > 0
    assert data["ttft_first_token_p50_ms"] > 0 and "errors" not in data
    assert set(data["ttft_samples_ms"]) == {"ttft", "decode", "prepare", "first_token"}
    assert min(data["ttft_samples_ms"]["ttft"]) == pytest.approx(data["ttft_min_ms"])
    profile = data["prefill_profile"]  # CPU: no CUDA kernels to count, but the profiled call ran
    assert profile["wall_ms"] > 0 and profile["kernels"] == 0 and profile["kernel_ms"] == 0
    assert "prefill + first token, profiled" in (tmp_path / "gpu.md").read_text()
    assert [(s["accel"], s["new_tokens"]) for s in data["server"]] == [("off", 4), ("on", 4), ("on", 6)]
    for s in data["server"]:
        assert s["sequential_errors"] == s["batched_errors"] == 0
        # forced length
        assert s["sequential_mean_completion_tokens"] == s["batched_mean_completion_tokens"] == s["new_tokens"]
    assert "batch-1 decode" in (tmp_path / "gpu.md").read_text()


def test_gpu_script_refuses_7b_run_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SystemExit) as e:
        gpu.main([])
    assert e.value.code == 2


def test_7b_config_has_llava15_shape():
    config = model7b.llava15_7b_config(image_token_index=4, pad_token_id=3, bos=1, eos=2)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size) == (4096, 32, 11008,
                                                                                                   32064)
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (336, 14, 1024, 24)
    assert config.image_seq_length == (336 // 14) ** 2 == 576


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_script_7b_small_run(tmp_path):
    assert gpu.main(["--new-tokens", "8", "--requests", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0


def test_run_cpu_rejects_zero_rounds():
    with pytest.raises(SystemExit) as e:
        run_cpu.main(["--rounds", "0"])
    assert e.value.code == 2
