"""The light client: `predict(image, question)` against a server or a SageMaker endpoint, and the `llava-sm` CLI.

    from client import predict, predict_full, predict_stream, ClientError

Importing it loads no torch, transformers or boto3 (boto3 is imported on the first endpoint call).
"""

from client.invoke import ClientError, predict, predict_full
from client.stream import predict_stream

__all__ = ["ClientError", "predict", "predict_full", "predict_stream"]
