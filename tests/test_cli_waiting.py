"""Waiting on jobs and endpoints that end badly. moto finishes every training job and endpoint at once, so these
paths run on real botocore clients with botocore's own Stubber queueing the Describe* answers SageMaker gives."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from client.deploy import endpoint_failure, wait_in_service
from client.training import report_job, wait_for_job


@pytest.fixture
def sm(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("sagemaker", region_name="us-east-1", endpoint_url="http://127.0.0.1:9")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _endpoint(status, **extra):
    return {"EndpointName": "ep", "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/ep",
            "EndpointStatus": status, "CreationTime": 0, "LastModifiedTime": 0, **extra}


def test_endpoint_failure_is_reported_with_its_reason(sm, capsys):
    client, stubber = sm
    for answer in (_endpoint("Creating"), _endpoint("Creating"),
                   _endpoint("Failed", FailureReason="The primary container did not pass the ping health check.")):
        stubber.add_response("describe_endpoint", answer, {"EndpointName": "ep"})
    desc = wait_in_service(client, "ep", timeout_s=60, poll_s=0)
    message = endpoint_failure(desc)
    assert "did not pass the ping health check" in message
    assert "llava-sm delete --endpoint-name ep" in message
    assert capsys.readouterr().err.splitlines() == ["endpoint ep: Creating", "endpoint ep: Failed"]


def test_endpoint_wait_gives_up_after_its_timeout(sm):
    client, stubber = sm
    stubber.add_response("describe_endpoint", _endpoint("Creating"), {"EndpointName": "ep"})
    with pytest.raises(TimeoutError, match="still Creating after 0 s"):
        wait_in_service(client, "ep", timeout_s=0, poll_s=0)


def test_in_service_is_no_failure():
    assert endpoint_failure(_endpoint("InService")) is None


def _job(status, secondary, **extra):
    return {"TrainingJobName": "job", "TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/job",
            "TrainingJobStatus": status, "SecondaryStatus": secondary, "CreationTime": 0,
            "AlgorithmSpecification": {"TrainingInputMode": "FastFile"}, "ModelArtifacts": {"S3ModelArtifacts": ""},
            "ResourceConfig": {"InstanceCount": 1, "VolumeSizeInGB": 100}, "StoppingCondition": {},
            "SecondaryStatusTransitions": [{"Status": secondary, "StartTime": 0, "StatusMessage": f"{secondary}..."}],
            **extra}


def test_failed_training_job_is_reported(sm, capsys):
    client, stubber = sm
    for answer in (_job("InProgress", "Starting"), _job("InProgress", "Training"), _job("InProgress", "Training"),
                   _job("Failed", "Failed", FailureReason="AlgorithmError: CUDA out of memory")):
        stubber.add_response("describe_training_job", answer, {"TrainingJobName": "job"})
    desc = wait_for_job(client, None, "job", poll_s=0)
    assert report_job(desc) == 1
    err = capsys.readouterr().err
    assert err.count("job: InProgress / Training") == 1  # a status is printed when it changes, not every poll
    assert "training job job Failed: AlgorithmError: CUDA out of memory" in err
