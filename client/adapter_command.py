"""`llava-sm adapter add|remove|list`: LoRA adapters as inference components on an endpoint's base component.

    llava-sm adapter add    --endpoint-name chart-qa --base-component chart-qa-base --name charts-v2 \\
                            --artifact s3://my-bucket/adapters/charts-v2/adapter.tar.gz
    llava-sm adapter list   --endpoint-name chart-qa
    llava-sm adapter remove --name charts-v2
    llava-sm predict chart.png "What is the title?" --endpoint-name chart-qa --inference-component charts-v2

The endpoint must have been deployed with `llava-sm deploy --inference-component <base>`. `add` creates an adapter
component (`BaseInferenceComponentName` + `ArtifactUrl`: the adapter.tar.gz that `python -m train --export adapter`
writes) and waits until SageMaker has loaded it into the base's container; `remove` deletes one and waits until it is
gone; `list` shows the endpoint's components. The walkthrough: docs/adapters.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from client import options as o
from client.options import option

AWS_HELP = {"region": "AWS region (default: profile / AWS_DEFAULT_REGION)", "profile": "AWS named profile",
            "endpoint_url": "SageMaker endpoint URL override (default: AWS_ENDPOINT_URL)"}


@dataclasses.dataclass
class AddOptions:
    endpoint_name: str | None = option(help="endpoint deployed with --inference-component", required=True)
    base_component: str | None = option(help="the endpoint's base inference component (holds the model)",
                                        required=True)
    name: str | None = option(help="the adapter component's name: invocations name it (--inference-component)",
                              required=True)
    artifact: str | None = option(help="S3 URI of the adapter's .tar.gz (python -m train --export adapter)",
                                  required=True)
    tags: dict[str, str] = option({}, "tag KEY=VALUE on the component", flag="--tag")
    wait: bool = option(True, "wait until the adapter is loaded (InService)")
    wait_timeout: int = option(1800, "give up waiting after this many seconds")
    region: str | None = option(help=AWS_HELP["region"])
    profile: str | None = option(help=AWS_HELP["profile"])
    endpoint_url: str | None = option(help=AWS_HELP["endpoint_url"])

    def problems(self) -> list[str]:
        p = [q for n in ("endpoint_name", "base_component", "name") for q in o.check_name(n, getattr(self, n))]
        p += o.check_s3("artifact", self.artifact, suffix=".tar.gz") + o.check_tags(self.tags)
        return p + o.check_range("wait_timeout", self.wait_timeout, 1)


@dataclasses.dataclass
class RemoveOptions:
    name: str | None = option(help="the adapter component to delete", required=True)
    wait: bool = option(True, "wait until it is gone")
    wait_timeout: int = option(1800, "give up waiting after this many seconds")
    region: str | None = option(help=AWS_HELP["region"])
    profile: str | None = option(help=AWS_HELP["profile"])
    endpoint_url: str | None = option(help=AWS_HELP["endpoint_url"])

    def problems(self) -> list[str]:
        return o.check_name("name", self.name) + o.check_range("wait_timeout", self.wait_timeout, 1)


@dataclasses.dataclass
class ListOptions:
    endpoint_name: str | None = option(help="the endpoint whose components to list", required=True)
    region: str | None = option(help=AWS_HELP["region"])
    profile: str | None = option(help=AWS_HELP["profile"])
    endpoint_url: str | None = option(help=AWS_HELP["endpoint_url"])

    def problems(self) -> list[str]:
        return o.check_name("endpoint_name", self.endpoint_name)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("adapter", help="add, remove or list LoRA adapter inference components",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, cls, func, text in (("add", AddOptions, run_add, "load an adapter onto the base component"),
                                  ("remove", RemoveOptions, run_remove, "delete an adapter component"),
                                  ("list", ListOptions, run_list, "list the endpoint's inference components")):
        sub = verbs.add_parser(verb, help=text, description=text)
        o.add_arguments(sub, cls)
        if verb == "list":
            sub.add_argument("--json", action="store_true", help="print the descriptions as JSON")
        else:
            sub.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
        sub.set_defaults(func=func)


def _sagemaker(opts: Any) -> Any:
    from client.aws import Clients

    return Clients(opts.region, opts.profile, opts.endpoint_url).sagemaker


def run_add(args: argparse.Namespace) -> int:
    from client.components import adapter_component_request, component_failure, describe_component, wait_for_component

    opts, _ = o.resolve(AddOptions, args, "adapter")
    sm = _sagemaker(opts)
    base = describe_component(sm, opts.base_component)
    problem = _base_problem(base, opts)
    if problem is None and describe_component(sm, opts.name) is not None:
        problem = f"inference component {opts.name} already exists: remove it first or pick another name"
    if problem:
        print(f"llava-sm adapter add: {problem}", file=sys.stderr)
        return 1
    sm.create_inference_component(**adapter_component_request(
        opts.name, endpoint_name=opts.endpoint_name, base_component=opts.base_component, artifact_url=opts.artifact,
        tags=o.tag_list(opts.tags)))
    print(f"creating adapter component {opts.name} on {opts.base_component}", file=sys.stderr)
    if opts.wait:
        failure = component_failure(wait_for_component(sm, opts.name, timeout_s=opts.wait_timeout,
                                                       poll_s=args.poll))
        if failure:
            print(failure, file=sys.stderr)
            return 1
    print(opts.name)
    return 0


def _base_problem(base: dict[str, Any] | None, opts: AddOptions) -> str | None:
    from client.components import is_adapter

    if base is None:
        return f"no inference component {opts.base_component}: deploy with --inference-component first"
    if base["EndpointName"] != opts.endpoint_name:
        return f"{opts.base_component} is on endpoint {base['EndpointName']}, not {opts.endpoint_name}"
    if is_adapter(base):
        return f"{opts.base_component} is itself an adapter; name the endpoint's base component"
    return None


def run_remove(args: argparse.Namespace) -> int:
    from client.components import describe_component, is_adapter, wait_for_component

    opts, _ = o.resolve(RemoveOptions, args, "adapter")
    sm = _sagemaker(opts)
    desc = describe_component(sm, opts.name)
    if desc is None or not is_adapter(desc):
        why = "does not exist" if desc is None else "is a base component (llava-sm delete removes the endpoint)"
        print(f"llava-sm adapter remove: inference component {opts.name} {why}", file=sys.stderr)
        return 1
    sm.delete_inference_component(InferenceComponentName=opts.name)
    if opts.wait:
        wait_for_component(sm, opts.name, timeout_s=opts.wait_timeout, poll_s=args.poll, gone=True)
    print(f"removed adapter component {opts.name}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from client.components import endpoint_components

    opts, _ = o.resolve(ListOptions, args, "adapter")
    components = endpoint_components(_sagemaker(opts), opts.endpoint_name)
    if args.json:
        print(json.dumps(components, indent=2, default=str))
        return 0
    for desc in components:
        spec = desc.get("Specification", {})
        role = f"adapter of {spec['BaseInferenceComponentName']}" if spec.get("BaseInferenceComponentName") \
            else f"base (model {spec.get('ModelName', '?')})"
        artifact = spec.get("Container", {}).get("ArtifactUrl", "")
        print(f"{desc['InferenceComponentName']}\t{desc.get('InferenceComponentStatus', '?')}\t{role}\t{artifact}")
    return 0
