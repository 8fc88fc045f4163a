"""`llava-sm delete`: remove an endpoint and exactly what `llava-sm deploy` made for it.

    llava-sm delete --endpoint-name chart-qa --dry-run    # list what would be deleted
    llava-sm delete --endpoint-name chart-qa

That is: the auto-scaling registration of its variants (if any), the endpoint, its endpoint config and the models
that config names. An endpoint that serves through inference components (`deploy --inference-component`) has its
components deleted first, adapters before their base, each waited for, and the models they name. Nothing else: the
model data in S3, other endpoints' configs and models are left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from client import options as o
from client.deploy import SCALABLE_DIMENSION, resource_id
from client.options import option


@dataclasses.dataclass
class DeleteOptions:
    endpoint_name: str | None = option(help="endpoint to delete", required=True)
    region: str | None = option(help="AWS region (default: profile / AWS_DEFAULT_REGION)")
    profile: str | None = option(help="AWS named profile")
    endpoint_url: str | None = option(help="SageMaker endpoint URL override (default: AWS_ENDPOINT_URL)")

    def problems(self) -> list[str]:
        return o.check_name("endpoint_name", self.endpoint_name)


def plan_deletion(sm: Any, scaling: Any, endpoint_name: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(service, operation, request) for everything to delete, in a safe order; reads only."""
    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    config_name = endpoint["EndpointConfigName"]
    config = sm.describe_endpoint_config(EndpointConfigName=config_name)
    variants = config.get("ProductionVariants", []) + config.get("ShadowProductionVariants", [])
    resource_ids = [resource_id(endpoint_name, v["VariantName"]) for v in variants]
    targets = scaling.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=resource_ids, ScalableDimension=SCALABLE_DIMENSION
    ).get("ScalableTargets", [])
    plan = [("application-autoscaling", "deregister_scalable_target",
             {"ServiceNamespace": "sagemaker", "ResourceId": t["ResourceId"], "ScalableDimension": SCALABLE_DIMENSION})
            for t in targets]
    components = component_deletions(sm, endpoint_name) if any(not v.get("ModelName") for v in variants) else []
    plan += [("sagemaker", "delete_inference_component", {"InferenceComponentName": c["InferenceComponentName"]})
             for c in components]
    plan.append(("sagemaker", "delete_endpoint", {"EndpointName": endpoint_name}))
    plan.append(("sagemaker", "delete_endpoint_config", {"EndpointConfigName": config_name}))
    named = [v.get("ModelName") for v in variants] + [c["Specification"].get("ModelName") for c in components]
    models = dict.fromkeys(m for m in named if m)
    plan += [("sagemaker", "delete_model", {"ModelName": m}) for m in models]
    return plan


def component_deletions(sm: Any, endpoint_name: str) -> list[dict[str, Any]]:
    """The endpoint's inference components in the order they can be deleted: adapters, then bases."""
    from client.components import endpoint_components, is_adapter

    return sorted(endpoint_components(sm, endpoint_name), key=lambda c: not is_adapter(c))


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("delete", help="delete an endpoint, its config and its model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_arguments(parser, DeleteOptions)
    parser.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")
    parser.add_argument("--poll", type=float, default=15.0,
                        help="seconds between checks that an inference component is gone")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from botocore.exceptions import ClientError

    from client.aws import Clients

    opts, _ = o.resolve(DeleteOptions, args, "delete")
    clients = Clients(opts.region, opts.profile, opts.endpoint_url)
    try:
        plan = plan_deletion(clients.sagemaker, clients.application_autoscaling, opts.endpoint_name)
    except ClientError as e:
        if e.response["Error"]["Code"] != "ValidationException":
            raise
        print(f"cannot delete {opts.endpoint_name}: {e.response['Error']['Message']}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps([{"service": s, "operation": op, "request": r} for s, op, r in plan], indent=2))
        return 0
    services = {"sagemaker": clients.sagemaker, "application-autoscaling": clients.application_autoscaling}
    for service, operation, request in plan:
        getattr(services[service], operation)(**request)
        if operation == "delete_inference_component":  # the endpoint cannot go while its components remain
            from client.components import wait_for_component

            wait_for_component(clients.sagemaker, request["InferenceComponentName"], timeout_s=3600,
                               poll_s=args.poll, gone=True)
        print(f"{operation} {' '.join(str(v) for v in request.values() if v not in ('sagemaker', SCALABLE_DIMENSION))}",
              file=sys.stderr)
    print(f"deleted endpoint {opts.endpoint_name}")
    return 0
