"""`llava-sm predict IMAGE QUESTION`: ask a running server (--url) or a SageMaker endpoint (--endpoint-name).

    llava-sm predict chart.png "What is the highest value?"                       # http://localhost:8080
    llava-sm predict s3://b/c.png "Which bar is tallest?" --endpoint-name chart-qa --json
    llava-sm predict chart.png "Describe the trend." --stream                      # print it as it is generated
    llava-sm predict chart.png "Title and chart type?" --json-schema chart.schema.json   # a JSON answer
    llava-sm predict chart.png "What is the title?" --endpoint-name chart-qa --inference-component charts-v2

Prints the answer (or, with --json, the full reply with token usage and latency). A server error prints its code
and message and exits 1; so does a --json-schema answer that ran out of tokens before its JSON was complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from client import options as o
from client.options import option


@dataclasses.dataclass
class PredictOptions:
    url: str | None = option(help="server base URL (default: http://localhost:8080 unless --endpoint-name)")
    endpoint_name: str | None = option(help="SageMaker endpoint to invoke instead of a URL")
    inference_component: str | None = option(help="the endpoint's inference component to ask (a LoRA adapter's)")
    adapter: str | None = option(help="a LoRA adapter loaded on the server itself (its name)")
    temperature: float | None = option(help="sampling temperature (0 = greedy; default: the model's)")
    top_p: float | None = option(help="nucleus sampling mass (0-1]")
    max_new_tokens: int | None = option(help="answer length cap in tokens")
    stop: list[str] = option([], "stop string; repeat for more (taken verbatim: no comma splitting)", split=False)
    json_schema: str | None = option(help="file holding a JSON Schema the answer must follow (a JSON object)")
    timeout: float = option(120.0, "seconds to wait for the answer")
    retries: int = option(3, "extra attempts after a connection failure or a busy (503) server")
    region: str | None = option(help="AWS region (default: profile / AWS_DEFAULT_REGION)")
    profile: str | None = option(help="AWS named profile")
    endpoint_url: str | None = option(help="SageMaker runtime endpoint URL override (default: AWS_ENDPOINT_URL)")

    def problems(self) -> list[str]:
        p = ["give --url or --endpoint-name, not both"] if self.url and self.endpoint_name else []
        p += o.check_url("url", self.url)
        p += o.check_name("endpoint_name", self.endpoint_name) + o.check_name("inference_component",
                                                                             self.inference_component)
        if self.inference_component and not self.endpoint_name:
            p.append("--inference-component needs --endpoint-name (a server of your own takes --adapter)")
        p += o.check_range("temperature", self.temperature, 0)
        p += o.check_range("top_p", self.top_p, 1e-9, 1)
        p += o.check_range("max_new_tokens", self.max_new_tokens, 1)
        p += o.check_range("timeout", self.timeout, 0.001) + o.check_range("retries", self.retries, 0)
        if self.json_schema is not None:
            try:
                read_schema(self.json_schema)
            except ValueError as e:
                p.append(str(e))
        return p


def read_schema(path: str) -> dict[str, Any]:
    """The JSON Schema in file `path`; ValueError naming the file when it cannot be read or is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise ValueError(f"json_schema: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"json_schema: {path} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema: {path} must hold a JSON object (a JSON Schema), not {type(schema).__name__}")
    return schema


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("predict", help="ask a question about an image (server URL or endpoint)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="local image path, http(s):// URL or s3:// URI")
    parser.add_argument("question", help="the question")
    o.add_arguments(parser, PredictOptions)
    parser.add_argument("--json", action="store_true", help="print the full JSON reply")
    parser.add_argument("--stream", action="store_true", help="print the answer piece by piece as it is generated "
                                                              "(with --json, the full reply after it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from client.invoke import ClientError, json_of, predict_full

    opts, _ = o.resolve(PredictOptions, args, "predict")
    schema = read_schema(opts.json_schema) if opts.json_schema else None
    kwargs = dict(url=opts.url, endpoint_name=opts.endpoint_name, temperature=opts.temperature, top_p=opts.top_p,
                  max_new_tokens=opts.max_new_tokens, stop=opts.stop or None, json_schema=schema,
                  adapter=opts.adapter, inference_component=opts.inference_component, timeout=opts.timeout,
                  retries=opts.retries, region=opts.region, profile=opts.profile, endpoint_url=opts.endpoint_url)
    try:
        result = (print_stream(args.image, args.question, kwargs) if args.stream
                  else predict_full(args.image, args.question, **kwargs))
    except (ClientError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.stream:
        print(result["answer"])
    if schema is not None:
        try:
            json_of(result)
        except ClientError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def print_stream(image: str, question: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Print the answer's pieces as they come; returns the final reply."""
    from client.stream import predict_stream

    stream = predict_stream(image, question, **kwargs)
    try:
        for piece in stream:
            print(piece, end="", flush=True)
    finally:
        print(flush=True)  # ends the answer's line, also when the stream broke off
    return stream.reply
