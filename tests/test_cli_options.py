"""`llava-sm` option handling: YAML + flags precedence, every validation error, all reported at once, before any
AWS call; `--dry-run` requests that botocore's own validator accepts. No AWS endpoint exists in these tests: the
variables point boto3 at a closed loopback port, so a command that tried to send a request would fail differently.
"""

from __future__ import annotations

import json

import botocore.session
import pytest
from botocore.validate import validate_parameters

from client.cli import main

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/llava-train:1"
SUBMIT_OK = ["submit", "--image-uri", IMAGE, "--role", ROLE, "--train", "s3://my-bucket/data/train/",
            "--output-path", "s3://my-bucket/out/"]
DEPLOY_OK = ["deploy", "--image-uri", IMAGE, "--role", ROLE, "--model-data", "s3://my-bucket/m/model.tar.gz",
             "--endpoint-name", "chart-qa"]


@pytest.fixture(autouse=True)
def no_aws(monkeypatch, tmp_path):
    for key in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing answers there
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def _problems(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def _valid_for(service, operation, request):
    model = botocore.session.get_session().get_service_model(service)
    validate_parameters(request, model.operation_model(operation).input_shape)  # raises on any invalid field


def test_submit_dry_run_prints_a_valid_create_training_job(capsys):
    rc = main([*SUBMIT_OK, "--dry-run", "--validation", "s3://my-bucket/data/val/", "--images", "s3://my-bucket/img/",
               "--spot", "--max-run", "3600", "--max-wait", "7200", "--checkpoint-s3-uri", "s3://my-bucket/ckpt/",
               "--subnets", "subnet-1,subnet-2", "--security-group-ids", "sg-1", "--tag", "team=ml",
               "--channel", "model=s3://my-bucket/base-model/", "--env", "NCCL_DEBUG=INFO", "--keep-alive", "600"])
    assert rc == 0
    request = json.loads(capsys.readouterr().out)
    _valid_for("sagemaker", "CreateTrainingJob", request)
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train", "validation", "images", "model"]
    assert request["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    assert request["TrainingJobName"].startswith("llava-sft-") and len(request["TrainingJobName"]) <= 63


def test_metric_definitions_fit_sagemaker_limits(capsys):
    # botocore validates minimums only; SageMaker's maximums: 40 definitions, names <= 255, regexes <= 500
    assert main([*SUBMIT_OK, "--dry-run", "--spot", "--max-wait", "86400"]) == 0
    out, err = capsys.readouterr()
    definitions = json.loads(out)["AlgorithmSpecification"]["MetricDefinitions"]
    assert 0 < len(definitions) <= 40
    assert all(len(d["Name"]) <= 255 and len(d["Regex"]) <= 500 for d in definitions)
    assert "interrupted job restarts from step 0" in err


def test_deploy_dry_run_prints_valid_requests(capsys):
    rc = main([*DEPLOY_OK, "--dry-run", "--instance-type", "ml.g6e.2xlarge", "--max-instances", "3",
               "--target-invocations", "20", "--env", "MAX_BATCH_SIZE=4", "--volume-size", "100"])
    assert rc == 0
    requests = json.loads(capsys.readouterr().out)
    for operation in ("CreateModel", "CreateEndpointConfig", "CreateEndpoint"):
        _valid_for("sagemaker", operation, requests[operation])
    for operation in ("RegisterScalableTarget", "PutScalingPolicy"):
        _valid_for("application-autoscaling", operation, requests[operation])
    assert requests["CreateEndpoint"]["EndpointConfigName"] == requests["CreateEndpointConfig"]["EndpointConfigName"]
    assert requests["RegisterScalableTarget"]["ResourceId"] == "endpoint/chart-qa/variant/AllTraffic"


@pytest.mark.parametrize("instance_type", ["ml.g5.2xlarge", "ml.g6.12xlarge", "ml.p5.48xlarge", "ml.p6-b200.48xlarge",
                                           "ml.m7i-flex.large", "ml.g4dn.xlarge"])
def test_new_instance_types_are_accepted(instance_type, capsys):
    assert main([*SUBMIT_OK, "--dry-run", "--instance-type", instance_type]) == 0


def test_yaml_then_flags(tmp_path, capsys):
    config = tmp_path / "all.yaml"
    config.write_text(
        f"role: {ROLE}\n"
        "instance_type: ml.g5.4xlarge\n"
        "submit:\n"
        f"  image_uri: {IMAGE}\n"
        "  train: s3://my-bucket/data/\n"
        "  output_path: s3://my-bucket/out/\n"
        "  instance_type: ml.g5.12xlarge\n"      # the section beats the top level
        "  hyperparameters: {max_steps: 3, learning_rate: 0.0002, lr_scheduler_kwargs: {power: 2}}\n"
        "deploy:\n"
        "  not_a_train_option: ignored\n"       # other commands' sections are not train's business
    )
    assert main(["submit", "--config", str(config), "--dry-run", "--hyperparameter", "max_steps=1",
                 "--volume-size", "200"]) == 0
    out, err = capsys.readouterr()
    request = json.loads(out)
    assert request["ResourceConfig"] == {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 1, "VolumeSizeInGB": 200}
    assert request["HyperParameters"] == {"max_steps": "1", "learning_rate": "0.0002",  # the flag wins per key
                                          "lr_scheduler_kwargs": '{"power": 2}'}
    assert "volume_size=200 (command line)" in err and f"instance_type='ml.g5.12xlarge' (config file {config})" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--image-uri", "llava-train"], "image_uri: 'llava-train' is not a container image URI"),
        (["--role", "SageMakerRole"], "role: 'SageMakerRole' is not an IAM role ARN"),
        (["--train", "my-bucket/data"], "train: 'my-bucket/data' is not an S3 URI"),
        (["--validation", "s3://B/x"], "validation: 's3://B/x' is not an S3 URI"),
        (["--images", "https://x/y"], "images: 'https://x/y' is not an S3 URI"),
        (["--output-path", "/tmp/out"], "output_path: '/tmp/out' is not an S3 URI"),
        (["--checkpoint-s3-uri", "s3:/x"], "checkpoint_s3_uri: 's3:/x' is not an S3 URI"),
        (["--channel", "bad name=s3://my-bucket/x/"], "channel 'bad name': names are 1-64"),
        (["--channel", "train=s3://my-bucket/x/"], "channel 'train': use --train"),
        (["--channel", "noequals"], "channels (from command line): expected KEY=VALUE, got 'noequals'"),
        (["--input-mode", "Pipe"], "input_mode: 'Pipe' is not one of FastFile, File"),
        (["--instance-type", "g5.2xlarge"], "instance_type: 'g5.2xlarge' is not a SageMaker instance type"),
        (["--instance-count", "0"], "instance_count: 0 must be >= 1"),
        (["--volume-size", "0"], "volume_size: 0 must be between 1 and 16384"),
        (["--max-run", "0"], "max_run: 0 must be between 1 and 2419200"),
        (["--max-run", "2419201"], "max_run: 2419201 must be between 1 and 2419200"),
        (["--keep-alive", "4000"], "keep_alive: 4000 must be between 0 and 3600"),
        (["--spot"], "--spot needs --max-wait"),
        (["--spot", "--max-run", "7200", "--max-wait", "3600"], "max_wait (3600) must be >= max_run (7200)"),
        (["--max-wait", "3600"], "max_wait is only used with --spot"),
        (["--hyperparameter", "x=" + "v" * 2501], "hyperparameters: 'x' (keys <= 256 characters, values <= 2500)"),
        (["--env", "1BAD=x"], "environment: '1BAD' is not a valid variable name"),
        (["--env", "K=" + "v" * 513], "environment: K is longer than 512"),
        (["--tag", "aws:owner=me"], "tags: 'aws:owner'"),
        (["--subnets", "subnet-1"], "subnets and security_group_ids go together"),
        (["--subnets", ",".join(f"s-{i}" for i in range(17)), "--security-group-ids", "sg-1"],
         "subnets: 17 given; SageMaker allows at most 16"),
        (["--job-name", "my_job"], "job_name: 'my_job' must be 1-63 letters"),
        (["--job-name", "x" * 64], "must be 1-63 letters"),
    ],
)
def test_submit_validation_errors(args, expected, capsys):
    assert expected in _problems([*SUBMIT_OK, *args], capsys)


@pytest.mark.parametrize(
    "hyperparameters, expected",
    [
        (["lora_rr=3"], "lora_rr (from hyperparameters): unknown setting; did you mean 'lora_r'?"),
        (["epochs=3"], "epochs (from hyperparameters): unknown setting; did you mean 'num_train_epochs'?"),
        (["lora_r=eight"], "lora_r (from hyperparameters): expected an integer, got 'eight'"),
        (["lora_r=0"], "lora_r (from hyperparameters): must be >= 1, got 0"),
        (["bits=3"], "bits (from hyperparameters): must be one of 4, 8, 16, got 3"),
        (["learning_rate=nan"], "learning_rate (from hyperparameters): expected a finite number, got 'nan'"),
        (["lr_scheduler_kwargs={min_lr: 1}"], "lr_scheduler_kwargs (from hyperparameters): not valid JSON"),
        (["bits=4"], "hyperparameters: --bits 4 needs --lora_enable True"),
        (["bits=4", "lora_enable=true", "deepspeed=zero3"], "hyperparameters: --bits 4 with ZeRO-3 is refused"),
        (["evaluation_strategy=steps"], "hyperparameters: --evaluation_strategy steps needs --validation_data_path"),
        (["lr_scheduler_type=greedy"], "greedy lowers the learning rate from the validation loss"),
    ],
)
def test_hyperparameters_are_checked_against_the_training_config(hyperparameters, expected, capsys):
    """What `python -m train` would refuse only after the instance started is refused before anything is sent."""
    args = [arg for h in hyperparameters for arg in ("--hyperparameter", h)]
    assert expected in _problems([*SUBMIT_OK, *args, "--dry-run"], capsys)


def test_valid_hyperparameters_pass_with_the_channels_the_job_mounts(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("hyperparameters: {lora_enable: true, bits: 4, deepspeed: zero2, lora_r: 8,\n"
                      "  learning_rate: 2e-4, evaluation_strategy: steps, eval-steps: 10, eval_strategy: steps,\n"
                      "  sagemaker_program: x,\n"
                      "  lr_scheduler_kwargs: {min_lr_rate: 0.1}, lr_scheduler_type: cosine_with_min_lr}\n")
    args = [*SUBMIT_OK, "--config", str(config), "--validation", "s3://my-bucket/val/", "--dry-run"]
    assert main(args) == 0, capsys.readouterr().err
    request = json.loads(capsys.readouterr().out)
    assert request["HyperParameters"]["bits"] == "4" and request["HyperParameters"]["lora_enable"] == "true"


def test_submit_limits_on_counts(capsys, tmp_path):
    config = tmp_path / "many.yaml"
    config.write_text("hyperparameters:\n" + "".join(f"  h{i}: {i}\n" for i in range(101))
                      + "environment:\n" + "".join(f"  E{i}: x\n" for i in range(101))
                      + "tags:\n" + "".join(f"  t{i}: x\n" for i in range(51)))
    err = _problems([*SUBMIT_OK, "--config", str(config)], capsys)
    assert "hyperparameters: 101 given; SageMaker allows at most 100" in err
    assert "environment: 101 variables; SageMaker allows at most 100" in err
    assert "tags: 51 tags; SageMaker allows at most 50" in err


def test_every_problem_is_reported_at_once(capsys):
    err = _problems(["submit", "--role", "nope", "--train", "nope", "--instance-count", "-1", "--spot"], capsys)
    for expected in ("image_uri: required (give --image-uri or `image_uri:` in the --config file)", "--output-path",
                     "role: 'nope'",
                     "train: 'nope'", "instance_count: -1", "--spot needs --max-wait"):
        assert expected in err


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("instnce_type: ml.g5.xlarge\n", "instnce_type (from config file CONFIG): unknown setting; did you mean "
                                         "'instance_type'?"),
        ("instance_count: two\n", "instance_count (from config file CONFIG): expected an integer, got 'two'"),
        ("instance_count: true\n", "instance_count (from config file CONFIG): expected an integer, got True"),
        ("spot: yes please\n", "spot (from config file CONFIG): expected true or false, got 'yes please'"),
        ("hyperparameters: [a, b]\n", "hyperparameters (from config file CONFIG): expected KEY=VALUE, got 'a'"),
        ("hyperparameters: 3\n", "hyperparameters (from config file CONFIG): expected a mapping, got int"),
        ("role: {a: b}\n", "role (from config file CONFIG): expected a string, got dict"),
        ("- just\n- a list\n", "expected a mapping of names to values, got list"),
        ("submit: [1]\n", "section 'submit' must be a mapping"),
        ("train: [1]\n", "train (from config file CONFIG): expected a string, got list"),  # submit's data option
        ("train: {role: x}\n", "the section of `llava-sm submit` is `submit:`, not `train:`"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_yaml_problems(yaml_text, expected, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    assert expected.replace("CONFIG", str(config)) in _problems([*SUBMIT_OK, "--config", str(config)], capsys)


def test_missing_yaml_file(tmp_path, capsys):
    assert "cannot read" in _problems([*SUBMIT_OK, "--config", str(tmp_path / "absent.yaml")], capsys)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model-data", "s3://my-bucket/m/model.zip"], "model_data: 's3://my-bucket/m/model.zip' must end with"),
        (["--model-data", "model.tar.gz"], "model_data: 'model.tar.gz' is not an S3 URI"),
        (["--endpoint-name", "chart_qa"], "endpoint_name: 'chart_qa' must be 1-63"),
        (["--instance-type", "gpu-large"], "instance_type: 'gpu-large' is not a SageMaker instance type"),
        (["--instance-count", "0"], "instance_count: 0 must be >= 1"),
        (["--startup-timeout", "30"], "startup_timeout: 30 must be between 60 and 3600"),
        (["--download-timeout", "4000"], "download_timeout: 4000 must be between 60 and 3600"),
        (["--volume-size", "513"], "volume_size: 513 must be between 1 and 512"),
        (["--env", "K=" + "v" * 1025], "environment: K is longer than 1024"),
        (["--env", "bad-key=1"], "environment: 'bad-key' is not a valid variable name"),
        (["--max-instances", "3"], "auto-scaling needs --target-invocations"),
        (["--max-instances", "1", "--min-instances", "2", "--target-invocations", "5"],
         "max_instances (1) must be >= min_instances (2)"),
        (["--max-instances", "4", "--min-instances", "2", "--target-invocations", "5"],
         "instance_count (1) must be between min_instances (2) and max_instances (4)"),
        (["--min-instances", "0", "--max-instances", "2", "--target-invocations", "5"],
         "min_instances: 0 must be >= 1"),
        (["--max-instances", "2", "--target-invocations", "0"], "target_invocations: 0.0 must be >= 0.001"),
        (["--target-invocations", "5"], "target_invocations needs --max-instances"),
        (["--max-instances", "2", "--target-invocations", "5", "--no-wait"], "drop --no-wait"),
        (["--role", "arn:aws:iam::12345:role/x"], "is not an IAM role ARN"),
    ],
)
def test_deploy_validation_errors(args, expected, capsys):
    assert expected in _problems([*DEPLOY_OK, *args], capsys)


def test_deploy_environment_total_size(capsys):
    envs = [arg for i in range(40) for arg in ("--env", f"K{i}=" + "v" * 1000)]
    assert "keys and values total" in _problems([*DEPLOY_OK, *envs], capsys)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--s3-uri", "s3://my-bucket/models"], "must end with / (a prefix) or .tar.gz"),
        (["--s3-uri", "bucket/models/"], "s3_uri: 'bucket/models/' is not an S3 URI"),
        ([], "give --s3-uri (upload) and/or --output (local archive)"),
        (["--output", "x.tar.gz", "--compress-level", "0"], "compress_level: 0 must be between 1 and 9"),
    ],
)
def test_package_validation_errors(args, expected, tiny_artifact, capsys):
    assert expected in _problems(["package", "--model-dir", tiny_artifact, *args], capsys)


def test_package_missing_dir(tmp_path, capsys):
    err = _problems(["package", "--model-dir", str(tmp_path / "nope"), "--output", "x.tar.gz"], capsys)
    assert "is not a directory" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--url", "http://x:8080", "--endpoint-name", "e"], "give --url or --endpoint-name, not both"),
        (["--url", "localhost:8080"], "url: 'localhost:8080' must start with http"),
        (["--temperature", "-1"], "temperature: -1.0 must be >= 0"),
        (["--top-p", "1.5"], "top_p: 1.5 must be between"),
        (["--max-new-tokens", "0"], "max_new_tokens: 0 must be >= 1"),
        (["--retries", "-1"], "retries: -1 must be >= 0"),
    ],
)
def test_predict_validation_errors(args, expected, capsys):
    assert expected in _problems(["predict", "img.png", "What?", *args], capsys)


def test_predict_stop_strings_are_taken_verbatim():
    """Stop strings are text: a newline, a comma or a leading space must reach the server as given (list flags of
    ids such as --subnets split on commas and strip; --stop must not)."""
    from client import options as o
    from client.cli import build_parser
    from client.predict_command import PredictOptions

    args = build_parser().parse_args(["predict", "img.png", "What?", "--stop", "\n", "--stop", "a, b", "--stop", " x"])
    opts, _ = o.resolve(PredictOptions, args, "predict")
    assert opts.stop == ["\n", "a, b", " x"]


def test_delete_validation(capsys):
    assert "endpoint_name: 'bad_name'" in _problems(["delete", "--endpoint-name", "bad_name"], capsys)


def test_no_region_is_a_clear_error_before_any_request(capsys):
    err = _problems([*DEPLOY_OK], capsys)
    assert "no AWS region" in err


def test_unknown_profile(capsys):
    assert "AWS profile 'nobody' not found" in _problems([*DEPLOY_OK, "--profile", "nobody"], capsys)
