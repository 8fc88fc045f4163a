"""`llava-sm deploy`: a real-time SageMaker endpoint for the serving image and a packaged model (boto3).

    llava-sm deploy --config endpoint.yaml --dry-run      # print the requests, send nothing
    llava-sm deploy --image-uri ... --model-data s3://b/llava/v1/model.tar.gz --role arn:... --endpoint-name chart-qa
    llava-sm deploy ... --inference-component chart-qa-base --component-memory-mb 16384   # adapters can attach

Creates a model (image + ModelDataUrl + server environment), an endpoint config (instance type and count, start-up
health-check and model-download timeouts) and the endpoint, then waits until it is InService (or prints why it
failed) and, when --max-instances is given, registers target-tracking auto-scaling on invocations per instance.
A `model_data` ending in `/` is served uncompressed from that S3 prefix (no tarball to extract: faster starts for
large models). If a create call fails, what this run already created is deleted again. `llava-sm delete` removes
exactly what deploy made.

With `--inference-component NAME` the endpoint serves through inference components instead: its config names no
model, and a base component NAME holds the model with the compute it asks for (`--component-*`); LoRA adapters then
attach to it as components of their own (`llava-sm adapter add`, docs/adapters.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from client import options as o
from client.components import base_component_request
from client.options import option
from client.training import generated_name

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"


@dataclasses.dataclass
class DeployOptions:
    image_uri: str | None = option(help="serving image URI (ECR)", required=True)
    model_data: str | None = option(help="S3 URI of model.tar.gz (or an S3 prefix ending in / holding the "
                                         "uncompressed model files)", required=True)
    role: str | None = option(help="IAM role ARN the endpoint's container runs with", required=True)
    endpoint_name: str | None = option(help="endpoint name", required=True)
    model_name: str | None = option(help="model name (default: <endpoint-name>-<UTC timestamp>)")
    endpoint_config_name: str | None = option(help="endpoint config name (default: same as the model name)")
    instance_type: str = option("ml.g5.xlarge", "instance type")
    instance_count: int = option(1, "initial number of instances")
    variant_name: str = option("AllTraffic", "production variant name")
    startup_timeout: int = option(900, "container start-up health-check timeout, seconds (60-3600)")
    download_timeout: int = option(1200, "model download (and extract) timeout, seconds (60-3600)")
    volume_size: int | None = option(help="ML storage volume per instance, GB (1-512; only for instance types "
                                          "without local NVMe storage)")
    environment: dict[str, str] = option({}, "server environment variable KEY=VALUE (see docs/serving.md)",
                                         flag="--env")
    tags: dict[str, str] = option({}, "tag KEY=VALUE on the model, endpoint config and endpoint", flag="--tag")
    subnets: list[str] = option([], "VPC subnet id(s) for the model (with --security-group-ids)")
    security_group_ids: list[str] = option([], "VPC security group id(s) (with --subnets)")
    min_instances: int | None = option(help="auto-scaling: minimum instances (default: --instance-count)")
    max_instances: int | None = option(help="auto-scaling: maximum instances (turns auto-scaling on)")
    target_invocations: float | None = option(help="auto-scaling: target invocations per instance per minute")
    scale_in_cooldown: int = option(300, "auto-scaling: seconds between scale-in activities")
    scale_out_cooldown: int = option(60, "auto-scaling: seconds between scale-out activities")
    inference_component: str | None = option(help="serve through inference components: the name of the base "
                                                   "component that holds the model (adapters attach to it)")
    component_accelerators: float | None = option(1.0, "base component: accelerators (GPUs) it needs; 0 for none")
    component_cpus: float | None = option(help="base component: CPU cores it needs")
    component_memory_mb: int = option(8192, "base component: host memory it needs, MiB")
    component_copies: int = option(1, "base component: copies of the model")
    wait: bool = option(True, "wait until the endpoint is InService (needed for auto-scaling)")
    wait_timeout: int = option(3600, "give up waiting after this many seconds")
    region: str | None = option(help="AWS region (default: profile / AWS_DEFAULT_REGION)")
    profile: str | None = option(help="AWS named profile")
    endpoint_url: str | None = option(help="SageMaker endpoint URL override (default: AWS_ENDPOINT_URL)")

    def problems(self) -> list[str]:
        p = o.check_image_uri("image_uri", self.image_uri) + o.check_role(self.role)
        p += o.check_s3("model_data", self.model_data)
        if self.model_data and not self.model_data.endswith(("/", ".tar.gz")):
            p.append(f"model_data: {self.model_data!r} must end with .tar.gz (an archive) or / (a prefix)")
        for name in ("endpoint_name", "model_name", "endpoint_config_name", "variant_name"):
            p += o.check_name(name, getattr(self, name))
        p += o.check_instance_type("instance_type", self.instance_type)
        p += o.check_range("instance_count", self.instance_count, 1)
        p += o.check_range("startup_timeout", self.startup_timeout, 60, 3600)
        p += o.check_range("download_timeout", self.download_timeout, 60, 3600)
        p += o.check_range("volume_size", self.volume_size, 1, 512)
        p += o.check_range("wait_timeout", self.wait_timeout, 1)
        # CreateModel's container environment: 100 entries, 1024 per key/value, 32 KiB combined.
        p += o.check_env("environment", self.environment, max_len=1024, max_total=32 * 1024)
        p += o.check_tags(self.tags) + o.check_vpc(self.subnets, self.security_group_ids)
        return p + self._scaling_problems() + self._component_problems()

    def _component_problems(self) -> list[str]:
        if not self.inference_component:
            return []
        p = o.check_name("inference_component", self.inference_component)
        if self.component_accelerators:  # 0 means none: left out of the request
            p += o.check_range("component_accelerators", self.component_accelerators, 1)
        p += o.check_range("component_cpus", self.component_cpus, 0.25)
        p += o.check_range("component_memory_mb", self.component_memory_mb, 128)
        p += o.check_range("component_copies", self.component_copies, 1)
        if self.autoscaling:
            p.append("auto-scaling with --inference-component: scale the component's copies instead "
                     "(sagemaker:inference-component:DesiredCopyCount); drop --max-instances")
        if not self.wait:
            p.append("the base component is created on an InService endpoint: drop --no-wait")
        return p

    @property
    def autoscaling(self) -> bool:
        return self.max_instances is not None

    @property
    def min_capacity(self) -> int:
        """The auto-scaling floor: --min-instances, else the starting --instance-count."""
        return self.min_instances if self.min_instances is not None else self.instance_count

    def _scaling_problems(self) -> list[str]:
        given = [n for n in ("min_instances", "target_invocations") if getattr(self, n) is not None]
        if not self.autoscaling:
            return [f"{n} needs --max-instances (auto-scaling)" for n in given]
        low = self.min_capacity
        p = o.check_range("min_instances", low, 1)
        if self.max_instances < low:
            p.append(f"max_instances ({self.max_instances}) must be >= min_instances ({low})")
        elif not low <= self.instance_count <= self.max_instances:
            p.append(f"instance_count ({self.instance_count}) must be between min_instances ({low}) and "
                     f"max_instances ({self.max_instances})")
        if self.target_invocations is None:
            p.append("auto-scaling needs --target-invocations (invocations per instance per minute)")
        else:
            p += o.check_range("target_invocations", self.target_invocations, 0.001)
        p += o.check_range("scale_in_cooldown", self.scale_in_cooldown, 0)
        p += o.check_range("scale_out_cooldown", self.scale_out_cooldown, 0)
        if not self.wait:
            p.append("auto-scaling is registered on an InService endpoint: drop --no-wait")
        return p


def resource_id(endpoint_name: str, variant_name: str) -> str:
    return f"endpoint/{endpoint_name}/variant/{variant_name}"


def build_requests(opts: DeployOptions, *, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Every request deploy sends, by API name, in order."""
    model_name = opts.model_name or generated_name(opts.endpoint_name, now=now)
    config_name = opts.endpoint_config_name or model_name
    tags = {"Tags": o.tag_list(opts.tags)} if opts.tags else {}
    container: dict[str, Any] = {"Image": opts.image_uri, "Environment": dict(opts.environment)}
    if opts.model_data.endswith("/"):
        container["ModelDataSource"] = {"S3DataSource": {
            "S3Uri": opts.model_data, "S3DataType": "S3Prefix", "CompressionType": "None"}}
    else:
        container["ModelDataUrl"] = opts.model_data
    model: dict[str, Any] = {"ModelName": model_name, "ExecutionRoleArn": opts.role, "PrimaryContainer": container,
                             **tags}
    vpc = o.vpc_config(opts.subnets, opts.security_group_ids)
    if vpc:
        model["VpcConfig"] = vpc
    variant: dict[str, Any] = {
        "VariantName": opts.variant_name,
        "ModelName": model_name,
        "InstanceType": opts.instance_type,
        "InitialInstanceCount": opts.instance_count,
        "ContainerStartupHealthCheckTimeoutInSeconds": opts.startup_timeout,
        "ModelDataDownloadTimeoutInSeconds": opts.download_timeout,
    }
    if opts.volume_size is not None:
        variant["VolumeSizeInGB"] = opts.volume_size
    config: dict[str, Any] = {"EndpointConfigName": config_name, "ProductionVariants": [variant], **tags}
    if opts.inference_component:  # the component names the model and takes the start-up timeouts
        for key in ("ModelName", "ContainerStartupHealthCheckTimeoutInSeconds", "ModelDataDownloadTimeoutInSeconds"):
            del variant[key]
        config["ExecutionRoleArn"] = opts.role
    requests = {
        "CreateModel": model,
        "CreateEndpointConfig": config,
        "CreateEndpoint": {"EndpointName": opts.endpoint_name, "EndpointConfigName": config_name, **tags},
    }
    if opts.inference_component:
        requests["CreateInferenceComponent"] = base_component_request(
            opts.inference_component, endpoint_name=opts.endpoint_name, variant_name=opts.variant_name,
            model_name=model_name, accelerators=opts.component_accelerators or None, cpus=opts.component_cpus,
            memory_mb=opts.component_memory_mb, copies=opts.component_copies, startup_timeout=opts.startup_timeout,
            download_timeout=opts.download_timeout, tags=tags.get("Tags", []))
    if opts.autoscaling:
        requests.update(scaling_requests(opts))
    return requests


def scaling_requests(opts: DeployOptions) -> dict[str, dict[str, Any]]:
    rid = resource_id(opts.endpoint_name, opts.variant_name)
    low = opts.min_capacity
    return {
        "RegisterScalableTarget": {"ServiceNamespace": "sagemaker", "ResourceId": rid,
                                   "ScalableDimension": SCALABLE_DIMENSION,
                                   "MinCapacity": low, "MaxCapacity": opts.max_instances},
        "PutScalingPolicy": {
            "PolicyName": f"{opts.endpoint_name}-invocations",
            "ServiceNamespace": "sagemaker", "ResourceId": rid, "ScalableDimension": SCALABLE_DIMENSION,
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": opts.target_invocations,
                "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                "ScaleInCooldown": opts.scale_in_cooldown,
                "ScaleOutCooldown": opts.scale_out_cooldown,
            },
        },
    }


def endpoint_exists(sm: Any, name: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        sm.describe_endpoint(EndpointName=name)
    except ClientError as e:
        if e.response["Error"]["Code"] == "ValidationException":  # "Could not find endpoint ..."
            return False
        raise
    return True


def create_resources(sm: Any, requests: dict[str, dict[str, Any]]) -> None:
    """Model, endpoint config, endpoint; on a failed call, delete what was created before re-raising."""
    undo = []
    try:
        sm.create_model(**requests["CreateModel"])
        undo.append(lambda: sm.delete_model(ModelName=requests["CreateModel"]["ModelName"]))
        sm.create_endpoint_config(**requests["CreateEndpointConfig"])
        undo.append(lambda: sm.delete_endpoint_config(
            EndpointConfigName=requests["CreateEndpointConfig"]["EndpointConfigName"]))
        sm.create_endpoint(**requests["CreateEndpoint"])
    except Exception:
        for step in reversed(undo):
            step()
        raise


def wait_in_service(sm: Any, name: str, *, timeout_s: float, poll_s: float = 15.0) -> dict[str, Any]:
    """Poll until the endpoint leaves Creating/Updating; print status changes; return the last description."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        desc = sm.describe_endpoint(EndpointName=name)
        status = desc["EndpointStatus"]
        if status != last:
            print(f"endpoint {name}: {status}", file=sys.stderr, flush=True)
            last = status
        if status not in ("Creating", "Updating", "SystemUpdating"):
            return desc
        if time.monotonic() > deadline:
            raise TimeoutError(f"endpoint {name} still {status} after {timeout_s:g} s; SageMaker keeps going: "
                               f"check it with `aws sagemaker describe-endpoint --endpoint-name {name}`")
        time.sleep(poll_s)


def endpoint_failure(desc: dict[str, Any]) -> str | None:
    """Why the endpoint is not serving (None when it is InService), with how to clean up."""
    if desc["EndpointStatus"] == "InService":
        return None
    name = desc["EndpointName"]
    return (f"endpoint {name} {desc['EndpointStatus']}: {desc.get('FailureReason', 'no reason given')}\n"
            f"its model and config are kept for inspection; remove all with: llava-sm delete --endpoint-name {name}")


def create_base_component(sm: Any, request: dict[str, Any], opts: DeployOptions, poll_s: float) -> int:
    """The component that holds the model, on the InService endpoint; waits until it serves."""
    from client.components import component_failure, wait_for_component

    sm.create_inference_component(**request)
    print(f"creating inference component {opts.inference_component}", file=sys.stderr)
    try:
        desc = wait_for_component(sm, opts.inference_component, timeout_s=opts.wait_timeout, poll_s=poll_s)
    except TimeoutError as e:
        print(e, file=sys.stderr)
        return 1
    failure = component_failure(desc)
    if failure:
        print(f"{failure}\nremove everything with: llava-sm delete --endpoint-name {opts.endpoint_name}",
              file=sys.stderr)
        return 1
    print(opts.endpoint_name)
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("deploy", help="create a SageMaker endpoint for a packaged model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_arguments(parser, DeployOptions)
    parser.add_argument("--dry-run", action="store_true", help="print the requests; send nothing")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from client.aws import Clients

    opts, sources = o.resolve(DeployOptions, args, "deploy")
    print(f"deploy options: {o.describe_sources(opts, sources)}", file=sys.stderr)
    requests = build_requests(opts)
    if args.dry_run:
        print(json.dumps(requests, indent=2))
        return 0
    clients = Clients(opts.region, opts.profile, opts.endpoint_url)
    sm = clients.sagemaker
    if endpoint_exists(sm, opts.endpoint_name):
        print(f"endpoint {opts.endpoint_name} already exists: delete it first (llava-sm delete --endpoint-name "
              f"{opts.endpoint_name}) or pick another name", file=sys.stderr)
        return 1
    create_resources(sm, requests)
    print(f"creating endpoint {opts.endpoint_name} (model {requests['CreateModel']['ModelName']})", file=sys.stderr)
    if not opts.wait:
        print(opts.endpoint_name)
        return 0
    try:
        desc = wait_in_service(sm, opts.endpoint_name, timeout_s=opts.wait_timeout, poll_s=args.poll)
    except TimeoutError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopped waiting; endpoint {opts.endpoint_name} keeps being created" +
              (" (auto-scaling was not registered)" if opts.autoscaling else ""), file=sys.stderr)
        return 130
    failure = endpoint_failure(desc)
    if failure:
        print(failure, file=sys.stderr)
        return 1
    if opts.inference_component:
        return create_base_component(sm, requests["CreateInferenceComponent"], opts, args.poll)
    if opts.autoscaling:
        scaling = clients.application_autoscaling
        scaling.register_scalable_target(**requests["RegisterScalableTarget"])
        scaling.put_scaling_policy(**requests["PutScalingPolicy"])
        print(f"auto-scaling: {requests['RegisterScalableTarget']['MinCapacity']}-{opts.max_instances} instances, "
              f"target {opts.target_invocations:g} invocations/instance/minute", file=sys.stderr)
    print(opts.endpoint_name)
    return 0
