"""ServeConfig from the environment: defaults, every variable parsed, every bad value reported naming its variable;
`python -m serve` refuses to start on a bad environment (exit 2) and on a model dir it cannot load (exit 1)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_support import free_port

from serve.config import ENV_VARS, ConfigError, ServeConfig
from serve.engine.accel import AccelConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_sagemaker_contract():
    cfg = ServeConfig.from_env({})
    assert cfg.model_dir == Path("/opt/ml/model")
    assert cfg.port == 8080
    assert cfg.quantization == "auto"
    assert cfg.max_payload_bytes == 6 * 1024 * 1024
    assert cfg.request_timeout_s < 60  # SageMaker's invocation limit
    assert cfg.graceful_timeout_s < 30  # SIGKILL follows SIGTERM after 30 s
    assert cfg.fetch_allow_networks == ()
    assert cfg.s3_buckets is None  # any bucket the execution role can read (docs/serving.md says to scope it)
    assert (cfg.scheduler, cfg.max_total_tokens) == ("batch", 0)  # 0: the model's context


def test_every_variable_is_read():
    env = {"SM_MODEL_DIR": "/m", "SERVE_HOST": "127.0.0.1", "SAGEMAKER_BIND_TO_PORT": "9000",
           "SERVE_QUANTIZATION": "BF16", "SERVE_DEVICE": "cuda:1", "SERVE_MAX_PAYLOAD_BYTES": "2048",
           "SERVE_MAX_IMAGE_BYTES": "4096", "SERVE_MAX_IMAGE_PIXELS": "1000", "SERVE_MAX_NEW_TOKENS": "64",
           "SERVE_REQUEST_TIMEOUT_S": "1.5", "SERVE_FETCH_TIMEOUT_S": "2", "SERVE_FETCH_MAX_REDIRECTS": "0",
           "SERVE_FETCH_ALLOW_NETWORKS": "127.0.0.0/8, 10.1.2.3", "SERVE_MAX_BATCH_SIZE": "4",
           "SERVE_MAX_WAIT_MS": "0", "SERVE_MAX_QUEUE": "3", "SERVE_MAX_INSTANCES": "2",
           "SERVE_GRACEFUL_TIMEOUT_S": "7", "SERVE_TORCH_THREADS": "1", "SERVE_LOG_LEVEL": "debug",
           "SERVE_PREPARE_THREADS": "3", "SERVE_S3_BUCKETS": "serve-images, my.other-bucket",
           "SERVE_ACCEL": "off", "SERVE_ACCEL_BATCH_BUCKETS": "8, 1,4", "SERVE_ACCEL_CACHE_BUCKET": "128",
           "SERVE_ACCEL_CACHE_GIB": "2.5", "SERVE_MODEL_NAME": "chart-llava", "SERVE_MAX_ADAPTERS": "3",
           "SERVE_MAX_ADAPTER_RANK": "16", "SERVE_ADAPTER_MEMORY_MB": "512", "SERVE_ADAPTER_ROOTS": "/a, /b",
           "SERVE_ADAPTER_S3_BUCKETS": "lora-bucket", "SERVE_ADAPTER_CACHE_DIR": "/c",
           "SERVE_SCHEDULER": "Continuous", "SERVE_PREFILL_TOKENS": "512", "SERVE_MAX_TOTAL_TOKENS": "300"}
    assert set(env) == set(ENV_VARS.values())
    cfg = ServeConfig.from_env(env)
    assert (cfg.model_dir, cfg.host, cfg.port, cfg.quantization, cfg.device) == (Path("/m"), "127.0.0.1", 9000,
                                                                                  "bf16", "cuda:1")
    assert (cfg.max_payload_bytes, cfg.max_image_bytes, cfg.max_image_pixels, cfg.max_new_tokens) == (2048, 4096,
                                                                                                       1000, 64)
    assert (cfg.request_timeout_s, cfg.fetch_timeout_s, cfg.fetch_max_redirects) == (1.5, 2.0, 0)
    assert cfg.fetch_allow_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.1.2.3/32"))
    assert (cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue, cfg.max_instances) == (4, 0.0, 3, 2)
    assert (cfg.graceful_timeout_s, cfg.torch_threads, cfg.log_level, cfg.prepare_threads) == (7.0, 1, "DEBUG", 3)
    assert "fetch_allow_networks=127.0.0.0/8,10.1.2.3/32" in cfg.summary()
    assert cfg.s3_buckets == ("serve-images", "my.other-bucket")
    assert (cfg.scheduler, cfg.prefill_tokens, cfg.max_total_tokens) == ("continuous", 512, 300)
    accel = cfg.accel_config()
    # SERVE_ACCEL_BATCH_BUCKETS=1,4,8 with SERVE_MAX_BATCH_SIZE=4: no batch can use 8, so it is not compiled
    assert (accel.mode, accel.batch_buckets, accel.cache_bucket, accel.cache_gib) == ("off", (1, 4), 128, 2.5)
    assert ServeConfig.from_env({}).accel_config() == AccelConfig(batch_buckets=(1, 2, 4, 8))  # max batch 8
    limits = cfg.adapter_limits()
    assert (limits.max_resident, limits.max_rank, limits.memory_bytes) == (3, 16, 512 * 1024 * 1024)
    assert limits.sources.local_roots == (Path("/a"), Path("/b")) and limits.sources.s3_buckets == ("lora-bucket",)
    assert limits.sources.cache_dir == Path("/c")
    assert ServeConfig.from_env({}).adapter_limits().sources.local_roots == (Path("/opt/ml/model"), Path("/opt/ml"))
    assert ServeConfig.from_env({"SERVE_MAX_ADAPTERS": "0"}).adapter_limits() is None  # adapters off


def test_only_the_batch_buckets_a_batch_can_reach_are_compiled():
    from serve.engine.accel import DEFAULT_BATCH_BUCKETS, buckets_up_to

    assert buckets_up_to(8, DEFAULT_BATCH_BUCKETS) == (1, 2, 4, 8)
    assert buckets_up_to(10, DEFAULT_BATCH_BUCKETS) == (1, 2, 4, 8, 16)  # 9-10 rows pad to 16
    assert buckets_up_to(64, DEFAULT_BATCH_BUCKETS) == DEFAULT_BATCH_BUCKETS  # 33-64 rows run unpadded
    assert buckets_up_to(1, DEFAULT_BATCH_BUCKETS) == (1,)
    assert buckets_up_to(3, (1, 4, 8)) == (1, 4)


def test_every_bad_value_is_reported_at_once_naming_its_variable():
    env = {"SAGEMAKER_BIND_TO_PORT": "80a", "SERVE_QUANTIZATION": "int8", "SERVE_MAX_BATCH_SIZE": "0",
           "SERVE_REQUEST_TIMEOUT_S": "nan", "SERVE_FETCH_ALLOW_NETWORKS": "10.0.0.0/8,not-a-net",
           "SERVE_DEVICE": "tpu", "SERVE_LOG_LEVEL": "loud", "SERVE_MAX_WAIT_MS": "-1", "SERVE_ACCEL": "fast",
           "SERVE_ACCEL_BATCH_BUCKETS": "1,x", "SERVE_ACCEL_CACHE_BUCKET": "0", "SERVE_ACCEL_CACHE_GIB": "inf",
           "SERVE_PREPARE_THREADS": "-1", "SERVE_S3_BUCKETS": "ok-bucket,Not_A_Bucket",
           "SERVE_ADAPTER_ROOTS": "relative/dir", "SERVE_MAX_ADAPTERS": "-1",
           "SERVE_SCHEDULER": "iteration", "SERVE_PREFILL_TOKENS": "0", "SERVE_MAX_TOTAL_TOKENS": "-5"}
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_env(env)
    problems = info.value.problems
    assert len(problems) == len(env)
    for var in env:
        assert any(p.startswith(var + ":") for p in problems), var
    assert "must be one of auto, nf4, bf16, fp16, none" in str(info.value)
    assert "not-a-net" in str(info.value)
    assert "not S3 bucket names: Not_A_Bucket" in str(info.value)
    assert "SERVE_SCHEDULER: must be one of continuous, batch, got 'iteration'" in str(info.value)


@pytest.mark.parametrize("raw, expected", [("*", None), ("none", ()), ("NONE", ()), ("one-bucket", ("one-bucket",)),
                                           (" a-bucket , b.bucket ,", ("a-bucket", "b.bucket"))])
def test_s3_buckets_any_none_or_a_list(raw, expected):
    assert ServeConfig.from_env({"SERVE_S3_BUCKETS": raw}).s3_buckets == expected


def test_sagemaker_batch_transform_payload_limit_is_honoured_unless_ours_is_set():
    assert ServeConfig.from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"}).max_payload_bytes == 20 * 1024 * 1024
    assert ServeConfig.from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "0"}).max_payload_bytes == 6 * 1024 * 1024
    both = {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "SERVE_MAX_PAYLOAD_BYTES": "4096"}
    assert ServeConfig.from_env(both).max_payload_bytes == 4096
    with pytest.raises(ConfigError, match="SAGEMAKER_MAX_PAYLOAD_IN_MB"):
        ServeConfig.from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "lots"})


def _serve(env_extra: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SM_", "SAGEMAKER_"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "serve"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_python_m_serve_exits_2_naming_the_bad_variable():
    proc = _serve({"SAGEMAKER_BIND_TO_PORT": "99999", "SERVE_MAX_QUEUE": "many", "SERVE_ACCEL": "fast"}, timeout=30)
    assert proc.returncode == 2
    assert "SERVE_ACCEL: must be one of auto, on, off, got 'fast'" in proc.stderr
    assert "SAGEMAKER_BIND_TO_PORT: must be between 1 and 65535, got 99999" in proc.stderr
    assert "SERVE_MAX_QUEUE: expected an integer, got 'many'" in proc.stderr


def test_python_m_serve_exits_1_when_the_model_cannot_load(tmp_path):
    proc = _serve({"SM_MODEL_DIR": str(tmp_path / "missing"), "SAGEMAKER_BIND_TO_PORT": str(free_port()),
                   "SERVE_HOST": "127.0.0.1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "does not exist" in proc.stderr
