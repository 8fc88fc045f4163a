"""Many adapters on one endpoint, from the client's side: `llava-sm deploy --inference-component`, `llava-sm adapter
add|list|remove`, `predict`/`predict_stream`/`llava-sm predict` with an inference component, and `llava-sm delete`,
against a loopback stand-in for SageMaker (tests/sagemaker_standin.py: requests checked with botocore's service
model) in front of a real model server, which loads the adapters our training job exported from a real moto S3."""

from __future__ import annotations

import json

import boto3
import pytest
import requests
from adapter_support import QUESTION
from sagemaker_standin import SageMakerStandIn
from serve_support import png_bytes, running_server, serve_config

from client import ClientError, predict, predict_full
from client.cli import main
from client.stream import predict_stream
from serve.http.app import create_app

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llava-serve:1"
BUCKET = "lora-adapters"
IMAGE = png_bytes((48, 40), (40, 160, 90))


@pytest.fixture(scope="module")
def platform(tmp_path_factory, tiny_artifact, trained_adapters, moto_server):
    """A real server on the tiny base (adapters from the moto bucket), the stand-in in front of it, and the
    adapters' archives in S3."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL_S3", moto_server)
        s3 = boto3.client("s3", endpoint_url=moto_server)
        s3.create_bucket(Bucket=BUCKET)
        for name in ("one", "two"):
            s3.upload_file(str(trained_adapters[f"{name}_out"] / "adapter.tar.gz"), BUCKET, f"{name}/adapter.tar.gz")
        s3.put_object(Bucket=BUCKET, Key="broken/adapter.tar.gz", Body=b"not a tarball")
        cfg = serve_config(tiny_artifact, adapter_s3_buckets=(BUCKET,),
                           adapter_cache_dir=tmp_path_factory.mktemp("adapter-cache"))
        with running_server(create_app(cfg)) as server:
            standin = SageMakerStandIn(server)
            try:
                yield {"server": server, "standin": standin, "url": standin.url}
            finally:
                standin.close()


def cli(platform, *args: str) -> int:
    return main([*args, "--endpoint-url", platform["url"], "--region", "us-east-1"])


def test_one_endpoint_many_adapters_from_deploy_to_delete(platform, capsys, tmp_path):
    server, standin, url = platform["server"], platform["standin"], platform["url"]
    assert cli(platform, "deploy", "--image-uri", IMAGE_URI, "--role", ROLE, "--model-data",
               "s3://models/llava/model.tar.gz", "--endpoint-name", "chart-qa", "--instance-type", "ml.g5.2xlarge",
               "--inference-component", "chart-qa-base", "--component-memory-mb", "4096", "--poll", "0.01") == 0
    config = next(p for op, p in standin.received if op == "CreateEndpointConfig")
    assert "ModelName" not in config["ProductionVariants"][0] and config["ExecutionRoleArn"] == ROLE
    base = next(p for op, p in standin.received if op == "CreateInferenceComponent")
    assert base["Specification"]["ComputeResourceRequirements"] == {"MinMemoryRequiredInMb": 4096,
                                                                    "NumberOfAcceleratorDevicesRequired": 1.0}

    for name in ("one", "two"):
        assert cli(platform, "adapter", "add", "--endpoint-name", "chart-qa", "--base-component", "chart-qa-base",
                   "--name", f"charts-{name}", "--artifact", f"s3://{BUCKET}/{name}/adapter.tar.gz",
                   "--poll", "0.01") == 0
    loaded = {a["name"] for a in requests.get(server + "/adapters", timeout=30).json()["adapters"]}
    assert loaded == {"charts-one", "charts-two"}  # the container loaded what the platform asked for
    capsys.readouterr()
    assert cli(platform, "adapter", "list", "--endpoint-name", "chart-qa") == 0
    listing = capsys.readouterr().out
    assert "charts-one\tInService\tadapter of chart-qa-base" in listing and "chart-qa-base\tInService\tbase" in listing

    endpoint = {"endpoint_name": "chart-qa", "endpoint_url": url, "region": "us-east-1", "temperature": 0,
                "max_new_tokens": 12}
    for component, adapter in (("charts-one", "charts-one"), ("charts-two", "charts-two"), ("chart-qa-base", None)):
        direct = predict(IMAGE, QUESTION, url=server, adapter=adapter, temperature=0, max_new_tokens=12)
        assert predict(IMAGE, QUESTION, inference_component=component, **endpoint) == direct
        stream = predict_stream(IMAGE, QUESTION, inference_component=component, **endpoint)
        assert "".join(stream) == stream.answer == direct
    capsys.readouterr()
    image = tmp_path / "chart.png"
    image.write_bytes(IMAGE)
    assert cli(platform, "predict", str(image), QUESTION, "--endpoint-name", "chart-qa", "--inference-component",
               "charts-two", "--temperature", "0", "--max-new-tokens", "12") == 0
    assert capsys.readouterr().out.strip() == predict(IMAGE, QUESTION, url=server, adapter="charts-two",
                                                      temperature=0, max_new_tokens=12).strip()

    with pytest.raises(ClientError) as no_component:  # an endpoint with components needs one named
        predict(IMAGE, QUESTION, **endpoint)
    assert no_component.value.status == 400 and "Inference Component Name" in no_component.value.message

    assert cli(platform, "adapter", "add", "--endpoint-name", "chart-qa", "--base-component", "chart-qa-base",
               "--name", "broken", "--artifact", f"s3://{BUCKET}/broken/adapter.tar.gz", "--poll", "0.01") == 1
    assert "invalid_adapter" in capsys.readouterr().err  # the container's refusal, as SageMaker reports it

    assert cli(platform, "adapter", "remove", "--name", "charts-two", "--poll", "0.01") == 0
    assert {a["name"] for a in requests.get(server + "/adapters", timeout=30).json()["adapters"]} == {"charts-one"}
    with pytest.raises(ClientError):
        predict(IMAGE, QUESTION, inference_component="charts-two", **endpoint)

    assert cli(platform, "delete", "--endpoint-name", "chart-qa", "--poll", "0.01") == 0
    deleted = [op for op, _ in standin.received if op.startswith("Delete")]
    assert deleted[-6:] == ["DeleteInferenceComponent", "DeleteInferenceComponent", "DeleteInferenceComponent",
                            "DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel"]
    assert not (standin.components or standin.endpoints or standin.configs or standin.models)
    assert requests.get(server + "/adapters", timeout=30).json()["adapters"] == []


def test_adapter_commands_refuse_what_cannot_work(platform, capsys):
    assert cli(platform, "adapter", "add", "--endpoint-name", "nowhere", "--base-component", "no-base", "--name",
               "x", "--artifact", f"s3://{BUCKET}/one/adapter.tar.gz") == 1
    assert "no inference component no-base" in capsys.readouterr().err
    assert cli(platform, "adapter", "remove", "--name", "nothing-here") == 1
    assert "nothing-here does not exist" in capsys.readouterr().err
    assert main(["adapter", "add", "--endpoint-name", "e", "--base-component", "b", "--name", "bad_name!",
                 "--artifact", "s3://my-bucket/not-an-archive"]) == 2  # checked before any request
    err = capsys.readouterr().err
    assert "name: 'bad_name!'" in err and "must end with .tar.gz" in err


def test_predict_refuses_an_inference_component_without_an_endpoint(capsys):
    with pytest.raises(ValueError, match="endpoint_name"):
        predict_full(IMAGE, QUESTION, url="http://127.0.0.1:9", inference_component="charts-one")
    assert main(["predict", "x.png", QUESTION, "--inference-component", "charts-one"]) == 2
    assert "--inference-component needs --endpoint-name" in capsys.readouterr().err


def test_deploy_dry_run_with_an_inference_component_is_valid_for_botocore(capsys):
    import botocore.session
    from botocore.validate import validate_parameters

    assert main(["deploy", "--image-uri", IMAGE_URI, "--role", ROLE, "--model-data", "s3://my-models/model.tar.gz",
                 "--endpoint-name", "chart-qa", "--inference-component", "chart-qa-base", "--component-cpus", "4",
                 "--component-copies", "2", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    model = botocore.session.get_session().get_service_model("sagemaker")
    for operation, request in plan.items():
        validate_parameters(request, model.operation_model(operation).input_shape)
    assert plan["CreateInferenceComponent"]["RuntimeConfig"] == {"CopyCount": 2}
    assert main(["deploy", "--image-uri", IMAGE_URI, "--role", ROLE, "--model-data", "s3://my-models/model.tar.gz",
                 "--endpoint-name", "chart-qa", "--inference-component", "chart-qa-base", "--max-instances", "2",
                 "--target-invocations", "10", "--dry-run"]) == 2
    assert "scale the component's copies" in capsys.readouterr().err
