"""`llava-sm submit / package / deploy / delete` against a real moto server on loopback (fixture `moto_server`).

Each test reads back what moto received through the same APIs a user would (describe_*, S3 get_object), so the
assertions are on the requests that reached "AWS", not on our own data structures.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tarfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests

from client.cli import main
from train.logs import METRIC_DEFINITIONS

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
TRAIN_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llava-train:1"
SERVE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llava-serve:1"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def recorded(moto_server):
    """The JSON requests moto received inside the block, as (X-Amz-Target, body) pairs (moto's own recorder)."""
    api = f"{moto_server}/moto-api/recorder"
    requests.post(f"{api}/reset-recording").raise_for_status()
    requests.post(f"{api}/start-recording").raise_for_status()
    received: list[tuple[str, dict]] = []
    try:
        yield received
    finally:
        requests.post(f"{api}/stop-recording").raise_for_status()
    recording = requests.get(f"{api}/download-recording")
    recording.raise_for_status()
    for line in recording.text.splitlines():
        entry = json.loads(line)
        body = base64.b64decode(entry["body"]) if entry.get("body_encoded") else entry.get("body") or "{}"
        target = entry["headers"].get("X-Amz-Target", "")
        if target:
            received.append((target, json.loads(body)))


@pytest.fixture
def aws(moto_server):
    def client(service):
        return boto3.client(service, endpoint_url=moto_server, region_name="us-east-1")

    return client


@pytest.fixture
def bucket(aws):
    name = _unique("llava-test")
    aws("s3").create_bucket(Bucket=name)
    return name


def _train_args(moto_server, bucket, *extra):
    return ["submit", "--endpoint-url", moto_server, "--image-uri", TRAIN_IMAGE, "--role", ROLE,
            "--train", f"s3://{bucket}/data/train/", "--validation", f"s3://{bucket}/data/val/",
            "--images", f"s3://{bucket}/data/images/", "--output-path", f"s3://{bucket}/output/", *extra]


def test_submit_submits_the_job_moto_receives(moto_server, bucket, aws, capsys, tmp_path):
    job = _unique("llava-sft")
    config = tmp_path / "job.yaml"
    # YAML with a submit: section; the flag --instance-count overrides the YAML's value.
    config.write_text(
        "instance_type: ml.g5.12xlarge\n"
        "submit:\n"
        "  instance_count: 4\n"
        "  hyperparameters: {num_train_epochs: 2, learning_rate: 2.0e-4, version: v1, lora_enable: true}\n"
        "  environment: {NCCL_DEBUG: WARN}\n"
        "  tags: {project: charts}\n"
    )
    with recorded(moto_server) as received:
        rc = main(_train_args(moto_server, bucket, "--config", str(config), "--instance-count", "2", "--job-name",
                              job, "--spot", "--max-run", "3600", "--max-wait", "7200",
                              "--checkpoint-s3-uri", f"s3://{bucket}/ckpt/{job}/", "--hyperparameter", "seed=7"))
    assert rc == 0
    assert job in capsys.readouterr().out
    (request,) = [body for target, body in received if target == "SageMaker.CreateTrainingJob"]
    # moto's describe answers canned metric definitions and drops some fields: check those on the request itself.
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert request["Tags"] == [{"Key": "project", "Value": "charts"}]
    assert request["Environment"] == {"NCCL_DEBUG": "WARN"}

    desc = aws("sagemaker").describe_training_job(TrainingJobName=job)
    algo = desc["AlgorithmSpecification"]
    assert algo["TrainingImage"] == TRAIN_IMAGE
    assert algo["TrainingInputMode"] == "FastFile"
    channels = {c["ChannelName"]: c for c in desc["InputDataConfig"]}
    assert set(channels) == {"train", "validation", "images"}
    for name, prefix in [("train", "data/train/"), ("validation", "data/val/"), ("images", "data/images/")]:
        assert channels[name]["InputMode"] == "FastFile"
        source = channels[name]["DataSource"]["S3DataSource"]
        assert source["S3Uri"] == f"s3://{bucket}/{prefix}" and source["S3DataType"] == "S3Prefix"
    assert desc["EnableManagedSpotTraining"] is True
    assert desc["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert desc["CheckpointConfig"] == {"S3Uri": f"s3://{bucket}/ckpt/{job}/", "LocalPath": "/opt/ml/checkpoints"}
    assert desc["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"
    assert desc["ResourceConfig"]["InstanceCount"] == 2  # flag beats YAML
    assert desc["HyperParameters"] == {"num_train_epochs": "2", "learning_rate": "0.0002", "version": "v1",
                                       "lora_enable": "true", "seed": "7"}
    assert desc["OutputDataConfig"]["S3OutputPath"] == f"s3://{bucket}/output/"
    assert desc["RoleArn"] == ROLE


def test_submit_wait_streams_status_and_logs(moto_server, bucket, aws, capsys):
    job = _unique("llava-logs")
    logs = aws("logs")
    group = "/aws/sagemaker/TrainingJobs"
    try:
        logs.create_log_group(logGroupName=group)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    now = int(time.time() * 1000)
    for host, lines in [("algo-1", ["[train] step=1 loss=2.5", "[train] step=2 loss=1.5"]), ("algo-2", ["ready"])]:
        stream = f"{job}/{host}-1700000000"
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        logs.put_log_events(logGroupName=group, logStreamName=stream,
                            logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(lines)])

    rc = main(_train_args(moto_server, bucket, "--job-name", job, "--wait", "--poll", "0.01"))

    out, err = capsys.readouterr()
    assert rc == 0
    assert f"{job}: Completed" in err
    assert "[algo-1-1700000000] [train] step=1 loss=2.5" in out
    assert "[algo-1-1700000000] [train] step=2 loss=1.5" in out and "[algo-2-1700000000] ready" in out
    assert out.count("step=1 loss=2.5") == 1  # no line printed twice across polls
    assert f"model artifacts: s3://{bucket}/output/{job}/output/model.tar.gz" in out


def test_submit_wait_without_any_logs(moto_server, bucket, capsys):
    # moto (like a fresh account) may have no log group or stream at all: waiting must still end cleanly.
    rc = main(_train_args(moto_server, bucket, "--job-name", _unique("nologs"), "--wait", "--poll", "0.01"))
    assert rc == 0
    assert "Completed" in capsys.readouterr().err


def test_aws_endpoint_url_env_is_honoured(moto_server, bucket, aws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    job = _unique("envurl")
    args = [a for a in _train_args(moto_server, bucket, "--job-name", job) if a not in ("--endpoint-url", moto_server)]
    assert main(args) == 0
    assert aws("sagemaker").describe_training_job(TrainingJobName=job)["TrainingJobName"] == job


# ---- package ----


def test_package_uploads_a_flat_archive(moto_server, bucket, aws, tiny_artifact, tmp_path, capsys):
    model_dir = tmp_path / "merged"
    model_dir.mkdir()
    for f in Path(tiny_artifact).iterdir():
        (model_dir / f.name).symlink_to(f)  # like a Hugging Face cache snapshot: symlinks are followed
    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "junk").write_text("x")
    (model_dir / "checkpoint-10").mkdir()
    (model_dir / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")

    rc = main(["package", "--endpoint-url", moto_server, "--model-dir", str(model_dir),
               "--s3-uri", f"s3://{bucket}/llava/v1/"])

    assert rc == 0
    assert capsys.readouterr().out.strip() == f"s3://{bucket}/llava/v1/model.tar.gz"
    body = aws("s3").get_object(Bucket=bucket, Key="llava/v1/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {f.name for f in Path(tiny_artifact).iterdir()}  # at the root, nothing extra
        assert all(m.isfile() for m in members.values())  # symlinks were dereferenced
        config = json.loads(tar.extractfile("config.json").read())
    assert config == json.loads((Path(tiny_artifact) / "config.json").read_text())


def test_package_large_file_uses_multipart(moto_server, bucket, aws, tiny_artifact, tmp_path):
    from client.packaging import PackageOptions, package

    model_dir = tmp_path / "big"
    model_dir.mkdir()
    for f in Path(tiny_artifact).iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "extra.bin.safetensors").write_bytes(os.urandom(11 * 2**20))  # incompressible: 3 parts of 5 MiB
    opts = PackageOptions(model_dir=str(model_dir), s3_uri=f"s3://{bucket}/big/model.tar.gz")
    s3 = aws("s3")

    uri = package(opts, s3=s3, multipart_bytes=5 * 2**20)

    assert uri == f"s3://{bucket}/big/model.tar.gz"
    head = s3.head_object(Bucket=bucket, Key="big/model.tar.gz")
    assert head["ETag"].strip('"').endswith("-3")  # S3's multipart ETag: <md5 of part md5s>-<part count>


def test_package_writes_local_archive_only(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "model.tar.gz"
    assert main(["package", "--model-dir", tiny_artifact, "--output", str(out)]) == 0
    with tarfile.open(out) as tar:
        assert "model.safetensors" in tar.getnames() and "chat_template.jinja" in tar.getnames()


def test_package_dry_run_lists_the_archive_and_writes_nothing(tiny_artifact, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a sent request would fail
    out = tmp_path / "model.tar.gz"
    assert main(["package", "--model-dir", tiny_artifact, "--output", str(out),
                 "--s3-uri", "s3://my-bucket/models/", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["upload_to"] == "s3://my-bucket/models/model.tar.gz"
    assert {"config.json", "model.safetensors", "chat_template.jinja"} <= set(plan["files"])
    assert not out.exists()
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    assert main(["package", "--model-dir", str(broken), "--dry-run"]) == 2  # checked like a real run


@pytest.mark.parametrize(
    "remove, add, expected",
    [
        ("config.json", None, "no config.json"),
        ("model.safetensors", "pytorch_model.bin", "weights are .bin"),
        ("model.safetensors", None, "no model.safetensors"),
        ("processor_config.json", None, "no processor_config.json"),
        ("tokenizer.json", None, "no tokenizer.json"),
        ("chat_template.jinja", None, "no chat template"),
    ],
)
def test_package_refuses_what_is_not_an_artifact(tiny_artifact, tmp_path, capsys, remove, add, expected):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for f in Path(tiny_artifact).iterdir():
        if f.name != remove:
            (model_dir / f.name).write_bytes(f.read_bytes())
    if add:
        (model_dir / add).write_bytes(b"x")
    out = tmp_path / "model.tar.gz"
    assert main(["package", "--model-dir", str(model_dir), "--output", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_package_refuses_adapter_and_missing_shards(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    assert main(["package", "--model-dir", str(adapter), "--output", str(tmp_path / "a.tar.gz")]) == 2
    assert "LoRA adapter" in capsys.readouterr().err

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert main(["package", "--model-dir", str(sharded), "--output", str(tmp_path / "b.tar.gz")]) == 2
    assert "missing: model-00002-of-00002.safetensors" in capsys.readouterr().err


# ---- deploy and delete ----


def _deploy_args(moto_server, bucket, endpoint, *extra):
    # moto's endpoint-config instance-type enum predates g5/g6: use ml.g4dn here (our own validation accepts both).
    return ["deploy", "--endpoint-url", moto_server, "--image-uri", SERVE_IMAGE, "--role", ROLE,
            "--model-data", f"s3://{bucket}/llava/v1/model.tar.gz", "--endpoint-name", endpoint,
            "--instance-type", "ml.g4dn.xlarge", "--poll", "0.01", *extra]


def test_deploy_creates_model_config_endpoint_and_autoscaling(moto_server, bucket, aws, capsys):
    endpoint = _unique("chart-qa")
    rc = main(_deploy_args(moto_server, bucket, endpoint, "--env", "MAX_BATCH_SIZE=8", "--env", "QUANTIZATION=nf4",
                           "--startup-timeout", "1200", "--download-timeout", "900", "--instance-count", "2",
                           "--max-instances", "4", "--target-invocations", "30", "--tag", "project=charts"))
    assert rc == 0
    assert capsys.readouterr().out.strip() == endpoint

    sm = aws("sagemaker")
    desc = sm.describe_endpoint(EndpointName=endpoint)
    assert desc["EndpointStatus"] == "InService"
    config = sm.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
    (variant,) = config["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g4dn.xlarge" and variant["InitialInstanceCount"] == 2
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 1200
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 900
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Image"] == SERVE_IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{bucket}/llava/v1/model.tar.gz"
    assert model["PrimaryContainer"]["Environment"] == {"MAX_BATCH_SIZE": "8", "QUANTIZATION": "nf4"}

    scaling = aws("application-autoscaling")
    rid = f"endpoint/{endpoint}/variant/AllTraffic"
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 4)
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)["ScalingPolicies"]
    (policy,) = policies
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 30.0
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"


def _names(sm):
    return (
        {e["EndpointName"] for e in sm.list_endpoints(MaxResults=100)["Endpoints"]},
        {c["EndpointConfigName"] for c in sm.list_endpoint_configs(MaxResults=100)["EndpointConfigs"]},
        {m["ModelName"] for m in sm.list_models(MaxResults=100)["Models"]},
    )


def test_delete_removes_exactly_what_deploy_made(moto_server, bucket, aws, capsys):
    sm = aws("sagemaker")
    aws("s3").put_object(Bucket=bucket, Key="llava/v1/model.tar.gz", Body=b"model")
    keep = _unique("keep")
    assert main(_deploy_args(moto_server, bucket, keep)) == 0
    before = _names(sm)
    endpoint = _unique("gone")
    assert main(_deploy_args(moto_server, bucket, endpoint, "--max-instances", "2",
                             "--target-invocations", "10")) == 0
    made = [after - old for after, old in zip(_names(sm), before, strict=True)]
    assert [len(m) for m in made] == [1, 1, 1]
    capsys.readouterr()

    assert main(["delete", "--endpoint-url", moto_server, "--endpoint-name", endpoint, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [p["operation"] for p in plan] == ["deregister_scalable_target", "delete_endpoint",
                                              "delete_endpoint_config", "delete_model"]
    assert _names(sm) == tuple(a | m for a, m in zip(before, made, strict=True))  # dry run deleted nothing

    assert main(["delete", "--endpoint-url", moto_server, "--endpoint-name", endpoint]) == 0
    assert _names(sm) == before  # the other endpoint, its config and model are untouched
    targets = aws("application-autoscaling").describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[f"endpoint/{endpoint}/variant/AllTraffic"])["ScalableTargets"]
    assert targets == []
    assert aws("s3").get_object(Bucket=bucket, Key="llava/v1/model.tar.gz")["Body"].read() == b"model"  # kept


def test_delete_unknown_endpoint(moto_server, capsys):
    assert main(["delete", "--endpoint-url", moto_server, "--endpoint-name", "no-such-endpoint"]) == 1
    assert "Could not find endpoint" in capsys.readouterr().err


def test_deploy_refuses_an_existing_endpoint(moto_server, bucket, aws, capsys):
    endpoint = _unique("twice")
    assert main(_deploy_args(moto_server, bucket, endpoint)) == 0
    models_before = _names(aws("sagemaker"))[2]
    assert main(_deploy_args(moto_server, bucket, endpoint)) == 1
    assert "already exists" in capsys.readouterr().err
    assert _names(aws("sagemaker"))[2] == models_before  # nothing new was created


def test_deploy_rolls_back_when_a_create_call_fails(moto_server, bucket, aws, capsys):
    # moto rejects ml.g5 in endpoint configs (an old enum): a real service-side failure after CreateModel.
    sm = aws("sagemaker")
    before = _names(sm)
    args = _deploy_args(moto_server, bucket, _unique("rollback"))
    args[args.index("ml.g4dn.xlarge")] = "ml.g5.xlarge"
    assert main(args) == 1
    assert "AWS error" in capsys.readouterr().err
    assert _names(sm) == before  # the model created first was deleted again


def test_deploy_uncompressed_prefix(moto_server, bucket, aws):
    endpoint = _unique("prefix")
    args = _deploy_args(moto_server, bucket, endpoint)
    args[args.index(f"s3://{bucket}/llava/v1/model.tar.gz")] = f"s3://{bucket}/llava/v1/model/"
    assert main(args) == 0
    sm = aws("sagemaker")
    config = sm.describe_endpoint_config(EndpointConfigName=sm.describe_endpoint(EndpointName=endpoint)[
        "EndpointConfigName"])
    container = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])["PrimaryContainer"]
    assert container["ModelDataSource"]["S3DataSource"] == {
        "S3Uri": f"s3://{bucket}/llava/v1/model/", "S3DataType": "S3Prefix", "CompressionType": "None"}
    assert "ModelDataUrl" not in container
