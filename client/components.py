"""SageMaker inference components: the requests `llava-sm deploy --inference-component` and `llava-sm adapter` send,
and waiting for a component to be ready or gone (boto3 has no waiters for inference components).

A *base* component holds the model (the serving image and its model data) with its own compute requirements on an
endpoint whose config names no model; each *adapter* component names that base and an `ArtifactUrl` (a LoRA adapter's
.tar.gz, as `python -m train --export adapter` writes it) and uses the base's compute. SageMaker then tells the base's
container to load the adapter (`POST /adapters`, serve/http/adapters.py) and routes invocations that name the adapter
component to it with the adapter's header. See docs/adapters.md.
"""

from __future__ import annotations

import sys
import time
from typing import Any

BUSY_STATES = ("Creating", "Updating", "Deleting")


def base_component_request(name: str, *, endpoint_name: str, variant_name: str, model_name: str,
                           accelerators: float | None, cpus: float | None, memory_mb: int, copies: int,
                           startup_timeout: int, download_timeout: int, tags: list[dict[str, str]]) -> dict[str, Any]:
    """CreateInferenceComponent for the component that holds the model."""
    compute: dict[str, Any] = {"MinMemoryRequiredInMb": memory_mb}
    if accelerators is not None:
        compute["NumberOfAcceleratorDevicesRequired"] = float(accelerators)
    if cpus is not None:
        compute["NumberOfCpuCoresRequired"] = float(cpus)
    request: dict[str, Any] = {
        "InferenceComponentName": name, "EndpointName": endpoint_name, "VariantName": variant_name,
        "Specification": {"ModelName": model_name, "ComputeResourceRequirements": compute,
                          "StartupParameters": {"ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout,
                                                "ModelDataDownloadTimeoutInSeconds": download_timeout}},
        "RuntimeConfig": {"CopyCount": copies},
    }
    return {**request, "Tags": tags} if tags else request


def adapter_component_request(name: str, *, endpoint_name: str, base_component: str, artifact_url: str,
                              tags: list[dict[str, str]]) -> dict[str, Any]:
    """CreateInferenceComponent for a LoRA adapter on `base_component` (no compute of its own)."""
    request: dict[str, Any] = {
        "InferenceComponentName": name, "EndpointName": endpoint_name,
        "Specification": {"BaseInferenceComponentName": base_component, "Container": {"ArtifactUrl": artifact_url}},
    }
    return {**request, "Tags": tags} if tags else request


def describe_component(sm: Any, name: str) -> dict[str, Any] | None:
    """The component's description, or None when there is none by that name."""
    from botocore.exceptions import ClientError

    try:
        return sm.describe_inference_component(InferenceComponentName=name)
    except ClientError as e:
        if e.response["Error"]["Code"] in ("ValidationException", "ResourceNotFound"):  # "Could not find ..."
            return None
        raise


def wait_for_component(sm: Any, name: str, *, timeout_s: float, poll_s: float = 15.0,
                       gone: bool = False) -> dict[str, Any] | None:
    """Poll until the component leaves Creating/Updating/Deleting (or, with `gone`, until it no longer exists);
    print status changes; return the last description (None once gone)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        desc = describe_component(sm, name)
        status = "gone" if desc is None else desc.get("InferenceComponentStatus", "?")
        if status != last:
            print(f"inference component {name}: {status}", file=sys.stderr, flush=True)
            last = status
        if desc is None or (status not in BUSY_STATES and not gone):
            return desc
        if time.monotonic() > deadline:
            raise TimeoutError(f"inference component {name} still {status} after {timeout_s:g} s; SageMaker keeps "
                               f"going: check it with `aws sagemaker describe-inference-component "
                               f"--inference-component-name {name}`")
        time.sleep(poll_s)


def component_failure(desc: dict[str, Any] | None) -> str | None:
    """Why the component is not serving (None when it is InService)."""
    if desc is None:
        return "the inference component no longer exists"
    if desc.get("InferenceComponentStatus") == "InService":
        return None
    return (f"inference component {desc['InferenceComponentName']} {desc.get('InferenceComponentStatus')}: "
            f"{desc.get('FailureReason', 'no reason given')}")


def endpoint_components(sm: Any, endpoint_name: str) -> list[dict[str, Any]]:
    """Every inference component on the endpoint, described (adapters name their base)."""
    names: list[str] = []
    kwargs: dict[str, Any] = {"EndpointNameEquals": endpoint_name, "MaxResults": 100}
    while True:
        page = sm.list_inference_components(**kwargs)
        names += [c["InferenceComponentName"] for c in page.get("InferenceComponents", [])]
        if not page.get("NextToken"):
            break
        kwargs["NextToken"] = page["NextToken"]
    found = [describe_component(sm, name) for name in names]
    return [d for d in found if d is not None]


def is_adapter(desc: dict[str, Any]) -> bool:
    return bool(desc.get("Specification", {}).get("BaseInferenceComponentName"))
