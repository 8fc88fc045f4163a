"""A loopback stand-in for SageMaker's control plane and runtime where inference components are concerned, in front of
a real model server: moto has no inference components, and cannot hold an endpoint config that names no model.

    standin = SageMakerStandIn(server_url)        # boto3 clients with endpoint_url=standin.url
    ... llava-sm deploy --inference-component / adapter add|remove|list / delete, predict(inference_component=...)

Every request is checked against botocore's own service model (required members, types, and what botocore leaves
to the service: maximum lengths, patterns, enums, ranges) and refused with a ValidationException as the service
would. Creating an endpoint or a component reports Creating first and InService at the next look; deleting one
reports Deleting, then it is gone. Creating an adapter component drives the model server the way the platform does
(`POST /adapters` with the component's name and ArtifactUrl); a server refusal makes the component Failed with the
server's message; deleting it sends `DELETE /adapters/{name}`. An invocation naming a component reaches the server
with SageMaker's adapter header (`X-Amzn-SageMaker-Adapter-Identifier`); an endpoint with components refuses
invocations that name none; a container error comes back as a 424 ModelError. An endpoint still holding components
cannot be deleted.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
import zlib
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import botocore.session
import requests
from botocore.validate import ParamValidationError, validate_parameters

ACCOUNT, REGION = "123456789012", "us-east-1"


class ServiceError(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def check(params: dict[str, Any], shape: Any) -> None:
    """botocore's validation plus the constraints it leaves to the service."""
    try:
        validate_parameters(params, shape)
    except ParamValidationError as e:
        raise ServiceError("ValidationException", str(e)) from None
    problems: list[str] = []
    _constraints(params, shape, shape.name, problems)
    if problems:
        raise ServiceError("ValidationException", "; ".join(problems))


def _constraints(value: Any, shape: Any, path: str, problems: list[str]) -> None:
    meta = shape.metadata
    if shape.type_name == "structure":
        for name, member in shape.members.items():
            if isinstance(value, dict) and name in value:
                _constraints(value[name], member, f"{path}.{name}", problems)
    elif shape.type_name == "list":
        for i, item in enumerate(value):
            _constraints(item, shape.member, f"{path}[{i}]", problems)
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{path}: at most {meta['max']} items")
    elif shape.type_name == "string":
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{path}: longer than {meta['max']}")
        pattern = _pattern(meta.get("pattern"))
        if pattern is not None and not pattern.fullmatch(value):
            problems.append(f"{path}: {value!r} does not match {meta['pattern']}")
        if shape.enum and value not in shape.enum:
            problems.append(f"{path}: {value!r} is not one of the enum")
    elif shape.type_name in ("integer", "long", "float", "double") and "max" in meta and value > meta["max"]:
        problems.append(f"{path}: over {meta['max']}")


def _pattern(text: str | None) -> re.Pattern | None:
    """The service's pattern as a Python regex (the few in Java-only syntax, such as \\p{ASCII}, are not checked)."""
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error:
        return None


def _arn(kind: str, name: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{kind}/{name.lower()}"


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


class SageMakerStandIn:
    def __init__(self, server: str):
        session = botocore.session.get_session()
        self.sagemaker = session.get_service_model("sagemaker")
        self.scaling = session.get_service_model("application-autoscaling")
        self.runtime = session.get_service_model("sagemaker-runtime")
        self.server = server
        self.models: dict[str, dict] = {}
        self.configs: dict[str, dict] = {}
        self.endpoints: dict[str, dict] = {}
        self.components: dict[str, dict] = {}
        self.received: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ HTTP
    def _handler(self) -> type:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/endpoints/"):
                    outer._invoke(self, body)
                else:
                    outer._control(self, body)

        return Handler

    def _control(self, handler: Any, body: bytes) -> None:
        target = handler.headers.get("X-Amz-Target", "")
        service, _, operation = target.partition(".")
        model = self.scaling if service == self.scaling.metadata["targetPrefix"] else self.sagemaker
        try:
            params = json.loads(body or b"{}")
            check(params, model.operation_model(operation).input_shape)
            with self._lock:
                self.received.append((operation, params))
                result = getattr(self, "op_" + re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower())(params)
            status, payload = 200, result
        except ServiceError as e:
            status, payload = e.status, {"__type": e.code, "message": e.message}
        raw = json.dumps(payload, default=_epoch).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/x-amz-json-1.1")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)

    # ------------------------------------------------------------------ control plane
    def op_create_model(self, p: dict) -> dict:
        self._unique(self.models, p["ModelName"], "model")
        self.models[p["ModelName"]] = p
        return {"ModelArn": _arn("model", p["ModelName"])}

    def op_create_endpoint_config(self, p: dict) -> dict:
        self._unique(self.configs, p["EndpointConfigName"], "endpoint configuration")
        for variant in p["ProductionVariants"]:
            if variant.get("ModelName") and variant["ModelName"] not in self.models:
                raise ServiceError("ValidationException", f"Could not find model {variant['ModelName']}.")
            if not variant.get("ModelName") and not p.get("ExecutionRoleArn"):
                raise ServiceError("ValidationException", "ExecutionRoleArn is required for an endpoint "
                                                          "configuration without models (inference components)")
        self.configs[p["EndpointConfigName"]] = {**p, "CreationTime": datetime.now(UTC)}
        return {"EndpointConfigArn": _arn("endpoint-config", p["EndpointConfigName"])}

    def op_create_endpoint(self, p: dict) -> dict:
        self._unique(self.endpoints, p["EndpointName"], "endpoint")
        if p["EndpointConfigName"] not in self.configs:
            raise ServiceError("ValidationException", f"Could not find endpoint configuration "
                                                      f"{p['EndpointConfigName']}.")
        now = datetime.now(UTC)
        self.endpoints[p["EndpointName"]] = {"EndpointName": p["EndpointName"], "EndpointArn": _arn(
            "endpoint", p["EndpointName"]), "EndpointConfigName": p["EndpointConfigName"], "EndpointStatus": "Creating",
            "CreationTime": now, "LastModifiedTime": now}
        return {"EndpointArn": _arn("endpoint", p["EndpointName"])}

    def op_describe_endpoint(self, p: dict) -> dict:
        endpoint = self._get(self.endpoints, p["EndpointName"], "endpoint")
        shown = dict(endpoint)
        endpoint["EndpointStatus"] = "InService"  # Creating once, then in service
        return shown

    def op_describe_endpoint_config(self, p: dict) -> dict:
        config = self._get(self.configs, p["EndpointConfigName"], "endpoint configuration")
        return {**config, "EndpointConfigArn": _arn("endpoint-config", config["EndpointConfigName"])}

    def op_delete_endpoint(self, p: dict) -> dict:
        self._get(self.endpoints, p["EndpointName"], "endpoint")
        held = [n for n, c in self.components.items() if c["EndpointName"] == p["EndpointName"]]
        if held:
            raise ServiceError("ValidationException", f"endpoint {p['EndpointName']} still has inference "
                                                      f"components: {', '.join(held)}")
        del self.endpoints[p["EndpointName"]]
        return {}

    def op_delete_endpoint_config(self, p: dict) -> dict:
        self._get(self.configs, p["EndpointConfigName"], "endpoint configuration")
        del self.configs[p["EndpointConfigName"]]
        return {}

    def op_delete_model(self, p: dict) -> dict:
        self._get(self.models, p["ModelName"], "model")
        del self.models[p["ModelName"]]
        return {}

    def op_create_inference_component(self, p: dict) -> dict:
        name, spec = p["InferenceComponentName"], p.get("Specification", {})
        self._unique(self.components, name, "inference component")
        endpoint = self._get(self.endpoints, p["EndpointName"], "endpoint")
        if endpoint["EndpointStatus"] != "InService":
            raise ServiceError("ValidationException", f"endpoint {p['EndpointName']} is not InService")
        failure = self._place(name, spec, p["EndpointName"])
        now = datetime.now(UTC)
        self.components[name] = {
            "InferenceComponentName": name, "InferenceComponentArn": _arn("inference-component", name),
            "EndpointName": p["EndpointName"], "EndpointArn": endpoint["EndpointArn"],
            "VariantName": p.get("VariantName") or "AllTraffic", "Specification": spec,
            "RuntimeConfig": {"DesiredCopyCount": p.get("RuntimeConfig", {}).get("CopyCount", 1),
                              "CurrentCopyCount": p.get("RuntimeConfig", {}).get("CopyCount", 1)},
            "CreationTime": now, "LastModifiedTime": now, "InferenceComponentStatus": "Creating",
            "_next": "Failed" if failure else "InService", **({"FailureReason": failure} if failure else {})}
        return {"InferenceComponentArn": _arn("inference-component", name)}

    def _place(self, name: str, spec: dict, endpoint: str) -> str | None:
        """Check the specification as the service does; for an adapter, have the base's container load it (the
        platform's POST /adapters). Returns why it failed, if it did."""
        base = spec.get("BaseInferenceComponentName")
        if not base:
            if spec.get("ModelName") not in self.models or "ComputeResourceRequirements" not in spec:
                raise ServiceError("ValidationException", "a component without a base needs ModelName and "
                                                          "ComputeResourceRequirements")
            return None
        owner = self._get(self.components, base, "inference component")
        if owner["EndpointName"] != endpoint or owner["Specification"].get("BaseInferenceComponentName"):
            raise ServiceError("ValidationException", f"{base} is not a base component of {endpoint}")
        if "ComputeResourceRequirements" in spec or not spec.get("Container", {}).get("ArtifactUrl"):
            raise ServiceError("ValidationException", "an adapter component takes an ArtifactUrl and no compute")
        reply = requests.post(self.server + "/adapters", timeout=120, json={
            "name": name, "src": spec["Container"]["ArtifactUrl"], "preload": True, "pin": False})
        return None if reply.status_code == 200 else f"the container refused the adapter: {reply.text}"

    def op_describe_inference_component(self, p: dict) -> dict:
        component = self._get(self.components, p["InferenceComponentName"], "inference component")
        shown = {k: v for k, v in component.items() if not k.startswith("_")}
        if component["InferenceComponentStatus"] == "Deleting":
            del self.components[p["InferenceComponentName"]]
        elif "_next" in component:
            component["InferenceComponentStatus"] = component.pop("_next")
        return shown

    def op_delete_inference_component(self, p: dict) -> dict:
        name = p["InferenceComponentName"]
        component = self._get(self.components, name, "inference component")
        adapters = [n for n, c in self.components.items()
                    if c["Specification"].get("BaseInferenceComponentName") == name]
        if adapters:
            raise ServiceError("ValidationException", f"{name} is the base of {', '.join(adapters)}")
        if component["Specification"].get("BaseInferenceComponentName"):
            requests.delete(f"{self.server}/adapters/{name}", timeout=120)
        component["InferenceComponentStatus"] = "Deleting"
        component.pop("_next", None)
        return {}

    def op_list_inference_components(self, p: dict) -> dict:
        keys = ("CreationTime", "InferenceComponentArn", "InferenceComponentName", "EndpointArn", "EndpointName",
                "VariantName", "InferenceComponentStatus", "LastModifiedTime")
        found = [{k: c[k] for k in keys} for c in self.components.values()
                 if p.get("EndpointNameEquals") in (None, c["EndpointName"])]
        return {"InferenceComponents": found}

    def op_describe_scalable_targets(self, p: dict) -> dict:
        return {"ScalableTargets": []}

    def _unique(self, table: dict, name: str, kind: str) -> None:
        if name in table:
            raise ServiceError("ValidationException", f"Cannot create already existing {kind} \"{name}\".")

    def _get(self, table: dict, name: str, kind: str) -> dict:
        if name not in table:
            raise ServiceError("ValidationException", f"Could not find {kind} \"{name}\".")
        return table[name]

    # ------------------------------------------------------------------ runtime
    def _invoke(self, handler: Any, body: bytes) -> None:
        parts = handler.path.split("/")  # /endpoints/NAME/invocations[-response-stream]
        stream = parts[3] == "invocations-response-stream"
        operation = self.runtime.operation_model("InvokeEndpointWithResponseStream" if stream else "InvokeEndpoint")
        params: dict[str, Any] = {"EndpointName": parts[2], "Body": body}
        for name, member in operation.input_shape.members.items():
            if member.serialization.get("location") == "header" and member.serialization["name"] in handler.headers:
                params[name] = handler.headers[member.serialization["name"]]
        try:
            check(params, operation.input_shape)
            headers = self._route(params)
        except ServiceError as e:
            return _reply(handler, e.status, json.dumps({"message": e.message}).encode(), e.code)
        upstream = requests.post(self.server + "/invocations", data=body, stream=stream, timeout=120,
                                 headers={"Content-Type": params.get("ContentType", "application/json"), **headers})
        if upstream.status_code != 200:
            error = json.dumps({"Message": "Received client error", "OriginalStatusCode": upstream.status_code,
                                "OriginalMessage": upstream.text}).encode()
            return _reply(handler, 424, error, "ModelError")
        if not stream:
            return _reply(handler, 200, upstream.content, None, content_type=upstream.headers["Content-Type"])
        handler.send_response(200)
        handler.send_header("Content-Type", "application/vnd.amazon.eventstream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for chunk in upstream.iter_content(chunk_size=None):
            handler.wfile.write(event_frame({":message-type": "event", ":event-type": "PayloadPart",
                                             ":content-type": "application/octet-stream"}, chunk))
            handler.wfile.flush()
        handler.close_connection = True

    def _route(self, params: dict[str, Any]) -> dict[str, str]:
        """The headers the container gets for an invocation of this endpoint (and component)."""
        with self._lock:
            endpoint = self._get(self.endpoints, params["EndpointName"], "endpoint")
            components = {n: c for n, c in self.components.items() if c["EndpointName"] == endpoint["EndpointName"]}
        name = params.get("InferenceComponentName")
        if components and not name:
            raise ServiceError("ValidationError", "Inference Component Name header is required for endpoints to "
                                                  "which you plan to deploy inference components.")
        if name is None:
            return {}
        component = components.get(name)
        if component is None or component["InferenceComponentStatus"] != "InService":
            raise ServiceError("ValidationError", f"Inference component {name} is not InService on this endpoint.")
        return ({"X-Amzn-SageMaker-Adapter-Identifier": name}
                if component["Specification"].get("BaseInferenceComponentName") else {})


def _reply(handler: Any, status: int, body: bytes, error_type: str | None, *,
           content_type: str = "application/json") -> None:
    handler.send_response(status)
    if error_type:
        handler.send_header("x-amzn-ErrorType", f"{error_type}:http://internal.amazon.com/coral/")
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One message of AWS's event-stream encoding: prelude (lengths + CRC), string headers, payload, CRC."""
    raw_headers = b"".join(bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
                           for k, v in headers.items())
    prelude = struct.pack(">II", 12 + len(raw_headers) + len(payload) + 4, len(raw_headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
