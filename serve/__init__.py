"""SageMaker inference server for a merged LLaVA artifact: `/ping` and `/invocations` on port 8080.

Importing the package has no side effects; `python -m serve` (or the container's `serve` command) starts it.
"""
