"""`llava-sm submit`: submit a SageMaker training job for the training image (CreateTrainingJob through boto3).

    llava-sm submit --config job.yaml --dry-run       # print the CreateTrainingJob request, send nothing
    llava-sm submit --config job.yaml --wait          # submit, then stream status changes and CloudWatch logs

Channels `train`, `validation`, `images` (and any extra `--channel NAME=s3://...`) are mounted in FastFile mode at
/opt/ml/input/data/<channel>; hyperparameters reach `python -m train` through hyperparameters.json (non-string YAML
values are JSON-encoded); the metric definitions are the training module's own (`train.logs`), so SageMaker charts
exactly the lines the trainer prints. Managed spot needs `max_wait >= max_run`, checked before anything is sent, and
so are the hyperparameters: names, types, choices, ranges and the checks across them that `python -m train` would
otherwise make only once the instance has started (train/sources.py `hyperparameter_problems`, without torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from typing import Any

from client import options as o
from client.options import option
from train.sources import hyperparameter_problems  # torch-free: TrainConfig and its checks

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")
MAX_RUNTIME_LIMIT = 28 * 24 * 3600  # SageMaker's MaxRuntimeInSeconds cap (28 days)
INPUT_MODES = ("FastFile", "File")


@dataclasses.dataclass
class TrainOptions:
    image_uri: str | None = option(help="training image URI (ECR)", required=True)
    role: str | None = option(help="IAM role ARN SageMaker assumes for the job", required=True)
    train: str | None = option(help="S3 URI of the training data (channel `train`)", required=True)
    output_path: str | None = option(help="S3 URI the job's model.tar.gz is written under", required=True)
    validation: str | None = option(help="S3 URI of the validation data (channel `validation`)")
    images: str | None = option(help="S3 URI of the image folder (channel `images`)")
    channels: dict[str, str] = option({}, "extra input channel NAME=s3://uri (for example a base-model channel)",
                                      flag="--channel")
    input_mode: str = option("FastFile", "input mode of every channel: FastFile (streamed) or File (copied)")
    instance_type: str = option("ml.g5.2xlarge", "training instance type")
    instance_count: int = option(1, "number of instances")
    volume_size: int = option(100, "EBS volume per instance, in GB")
    hyperparameters: dict[str, str] = option({}, "hyperparameter KEY=VALUE for `python -m train` (checked against "
                                                 "its flags before anything is sent)", flag="--hyperparameter")
    environment: dict[str, str] = option({}, "environment variable KEY=VALUE in the training container",
                                         flag="--env")
    spot: bool = option(False, "use managed spot capacity (needs --max-wait; set --checkpoint-s3-uri to resume)")
    max_run: int = option(86400, "maximum training time, seconds")
    max_wait: int | None = option(help="spot only: maximum time including waiting for capacity, seconds (>= max_run)")
    checkpoint_s3_uri: str | None = option(help="S3 URI that /opt/ml/checkpoints is synced with (resume after "
                                                "spot interruption)")
    checkpoint_local_path: str = option("/opt/ml/checkpoints", "checkpoint directory inside the container")
    job_name: str | None = option(help="training job name (default: <base-job-name>-<UTC timestamp>)")
    base_job_name: str = option("llava-sft", "prefix of generated job names")
    keep_alive: int | None = option(help="warm-pool keep-alive after the job, seconds (0-3600)")
    tags: dict[str, str] = option({}, "tag KEY=VALUE on the job", flag="--tag")
    subnets: list[str] = option([], "VPC subnet id(s) (with --security-group-ids)")
    security_group_ids: list[str] = option([], "VPC security group id(s) (with --subnets)")
    region: str | None = option(help="AWS region (default: profile / AWS_DEFAULT_REGION)")
    profile: str | None = option(help="AWS named profile")
    endpoint_url: str | None = option(help="SageMaker/S3/logs endpoint URL override (default: AWS_ENDPOINT_URL)")

    def problems(self) -> list[str]:
        p = o.check_image_uri("image_uri", self.image_uri) + o.check_role(self.role)
        for name in ("train", "validation", "images", "output_path", "checkpoint_s3_uri"):
            p += o.check_s3(name, getattr(self, name))
        for name, uri in self.channels.items():
            p += o.check_s3(f"channel {name}", uri)
            if not re.match(r"^[A-Za-z0-9.\-_]{1,64}$", name):
                p.append(f"channel {name!r}: names are 1-64 of [A-Za-z0-9.-_]")
            if name in ("train", "validation", "images"):
                p.append(f"channel {name!r}: use --{name} for this channel")
        if self.input_mode not in INPUT_MODES:
            p.append(f"input_mode: {self.input_mode!r} is not one of {', '.join(INPUT_MODES)}")
        p += o.check_instance_type("instance_type", self.instance_type)
        p += o.check_range("instance_count", self.instance_count, 1)
        p += o.check_range("volume_size", self.volume_size, 1, 16384)
        p += o.check_range("max_run", self.max_run, 1, MAX_RUNTIME_LIMIT)
        p += o.check_range("keep_alive", self.keep_alive, 0, 3600)
        p += self._spot_problems()
        p += self._hyperparameter_problems()
        p += o.check_env("environment", self.environment, max_len=512)
        p += o.check_tags(self.tags) + o.check_vpc(self.subnets, self.security_group_ids)
        p += o.check_name("job_name", self.job_name) + o.check_name("base_job_name", self.base_job_name)
        return p

    def _spot_problems(self) -> list[str]:
        if not self.spot:
            return ["max_wait is only used with --spot"] if self.max_wait is not None else []
        if self.max_wait is None:
            return [f"--spot needs --max-wait (seconds, >= max_run = {self.max_run})"]
        if self.max_wait < self.max_run:
            return [f"max_wait ({self.max_wait}) must be >= max_run ({self.max_run}) for managed spot training"]
        return []

    def _hyperparameter_problems(self) -> list[str]:
        """SageMaker's limits, then what `python -m train` would refuse once the instance has started (names, types,
        choices, ranges, checks across fields; nothing that needs the data or the model)."""
        hp = self.hyperparameters
        p = [f"hyperparameters: {len(hp)} given; SageMaker allows at most 100"] if len(hp) > 100 else []
        p += [f"hyperparameters: {k!r} (keys <= 256 characters, values <= 2500)"
              for k, v in hp.items() if len(k) > 256 or len(v) > 2500]
        channels = ["train", *(["validation"] if self.validation else []), *self.channels]
        return p + [str(problem) for problem in hyperparameter_problems(hp, channels)]


def metric_definitions() -> list[dict[str, str]]:
    from train.logs import METRIC_DEFINITIONS  # pure Python, no torch

    return [dict(d) for d in METRIC_DEFINITIONS]


def generated_name(base: str, *, now: float | None = None) -> str:
    """`<base>-YYYYmmdd-HHMMSS-mmm`, base truncated so the name fits SageMaker's 63 characters."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    return f"{base[: 63 - len(stamp) - 1].rstrip('-')}-{stamp}"


def _channel(name: str, uri: str, mode: str) -> dict[str, Any]:
    # FastFile requires S3Prefix; FullyReplicated: every instance sees the whole dataset (the sampler shards it).
    source = {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
    return {"ChannelName": name, "DataSource": {"S3DataSource": source}, "InputMode": mode}


def build_request(opts: TrainOptions, *, job_name: str | None = None) -> dict[str, Any]:
    """The CreateTrainingJob request for `opts` (already validated)."""
    channels = {"train": opts.train, "validation": opts.validation, "images": opts.images, **opts.channels}
    request: dict[str, Any] = {
        "TrainingJobName": job_name or opts.job_name or generated_name(opts.base_job_name),
        "AlgorithmSpecification": {
            "TrainingImage": opts.image_uri,
            "TrainingInputMode": opts.input_mode,
            "MetricDefinitions": metric_definitions(),
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "RoleArn": opts.role,
        "InputDataConfig": [_channel(n, uri, opts.input_mode) for n, uri in channels.items() if uri],
        "OutputDataConfig": {"S3OutputPath": opts.output_path},
        "ResourceConfig": {
            "InstanceType": opts.instance_type,
            "InstanceCount": opts.instance_count,
            "VolumeSizeInGB": opts.volume_size,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": opts.max_run},
        "HyperParameters": dict(opts.hyperparameters),
        "EnableManagedSpotTraining": opts.spot,
    }
    if opts.keep_alive is not None:
        request["ResourceConfig"]["KeepAlivePeriodInSeconds"] = opts.keep_alive
    if opts.spot:
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = opts.max_wait
    if opts.checkpoint_s3_uri:
        request["CheckpointConfig"] = {"S3Uri": opts.checkpoint_s3_uri, "LocalPath": opts.checkpoint_local_path}
    if opts.environment:
        request["Environment"] = dict(opts.environment)
    if opts.tags:
        request["Tags"] = o.tag_list(opts.tags)
    vpc = o.vpc_config(opts.subnets, opts.security_group_ids)
    if vpc:
        request["VpcConfig"] = vpc
    return request


# ---- waiting and logs ----


class LogTail:
    """Prints new CloudWatch events of a job's log streams (one per instance); tolerates a missing group."""

    def __init__(self, logs_client: Any, job_name: str, out: Any = None):
        self.logs, self.job_name, self.out = logs_client, job_name, out
        self.tokens: dict[str, str | None] = {}

    def poll(self) -> int:
        """Print what arrived since the last poll; returns the number of lines printed."""
        streams = self._streams()
        printed = 0
        for stream in streams:
            prefix = f"[{stream.split('/', 1)[-1]}] " if len(streams) > 1 else ""
            printed += self._drain(stream, prefix)
        return printed

    def _streams(self) -> list[str]:
        try:
            resp = self.logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=self.job_name + "/")
        except self.logs.exceptions.ResourceNotFoundException:
            return []  # the group appears with the first log line of the first job in the account/region
        return sorted(s["logStreamName"] for s in resp.get("logStreams", []))

    def _drain(self, stream: str, prefix: str) -> int:
        printed = 0
        while True:
            kwargs = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
            if self.tokens.get(stream):
                kwargs["nextToken"] = self.tokens[stream]
            resp = self.logs.get_log_events(**kwargs)
            for event in resp.get("events", []):
                print(prefix + event["message"].rstrip("\n"), file=self.out or sys.stdout, flush=True)
                printed += 1
            token = resp.get("nextForwardToken")
            if not resp.get("events") or token == self.tokens.get(stream):
                self.tokens[stream] = token or self.tokens.get(stream)
                return printed
            self.tokens[stream] = token


def wait_for_job(sm: Any, tail: LogTail | None, job_name: str, *, poll_s: float = 30.0) -> dict[str, Any]:
    """Poll until the job ends, printing status changes (stderr) and its logs (stdout); return the description."""
    last = None
    while True:
        desc = sm.describe_training_job(TrainingJobName=job_name)
        status = (desc["TrainingJobStatus"], desc.get("SecondaryStatus"))
        if status != last:
            message = desc.get("SecondaryStatusTransitions", [{}])[-1].get("StatusMessage", "")
            print(f"{job_name}: {status[0]} / {status[1]} {message}".rstrip(), file=sys.stderr, flush=True)
            last = status
        if tail:
            tail.poll()
        if status[0] in TERMINAL:
            return desc
        time.sleep(poll_s)


def report_job(desc: dict[str, Any]) -> int:
    status = desc["TrainingJobStatus"]
    if status == "Completed":
        print(f"model artifacts: {desc.get('ModelArtifacts', {}).get('S3ModelArtifacts')}")
        return 0
    print(f"training job {desc['TrainingJobName']} {status}: {desc.get('FailureReason', 'no reason given')}",
          file=sys.stderr)
    return 1


# ---- CLI ----


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("submit", help="submit a SageMaker training job", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_arguments(parser, TrainOptions)
    parser.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request; send nothing")
    parser.add_argument("--wait", action="store_true", help="stream status and logs until the job ends")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between status checks with --wait")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from client.aws import Clients

    opts, sources = o.resolve(TrainOptions, args, "submit")
    print(f"submit options: {o.describe_sources(opts, sources)}", file=sys.stderr)
    if opts.spot and not opts.checkpoint_s3_uri:
        print("note: --spot without --checkpoint-s3-uri: an interrupted job restarts from step 0", file=sys.stderr)
    request = build_request(opts)
    if args.dry_run:
        print(json.dumps(request, indent=2))
        return 0
    clients = Clients(opts.region, opts.profile, opts.endpoint_url)
    arn = clients.sagemaker.create_training_job(**request)["TrainingJobArn"]
    print(f"training job {request['TrainingJobName']} submitted ({arn})")
    if not args.wait:
        return 0
    tail = LogTail(clients.logs, request["TrainingJobName"])
    try:
        desc = wait_for_job(clients.sagemaker, tail, request["TrainingJobName"], poll_s=args.poll)
    except KeyboardInterrupt:
        print(f"stopped waiting; the job keeps running ({request['TrainingJobName']})", file=sys.stderr)
        return 130
    tail.poll()  # lines written just before the job ended
    return report_job(desc)
