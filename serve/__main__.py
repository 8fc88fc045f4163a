"""Run the inference server: `SM_MODEL_DIR=/path/to/model python -m serve` (the container's `serve` command).

Wires config -> app -> uvicorn and nothing else. A bad environment variable exits 2 with a message naming it;
a model that fails to load exits 1 (SageMaker then reports the failed start). On SIGTERM uvicorn stops accepting
connections, lets in-flight requests finish for up to SERVE_GRACEFUL_TIMEOUT_S, then the batcher stops and the
process exits 0: being told to stop and stopping cleanly is success (SageMaker scale-in, `docker stop`).
"""

from __future__ import annotations

import logging
import math
import signal
import sys

from serve.config import ConfigError, ServeConfig

log = logging.getLogger("serve")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = ServeConfig.from_env()
    except ConfigError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("config: %s", cfg.summary())

    import uvicorn

    from serve.http.app import create_app

    failures: list[BaseException] = []

    def on_load_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app = create_app(cfg, on_load_failure=on_load_failure)
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=math.ceil(cfg.graceful_timeout_s)))
    # uvicorn restores the previous SIGTERM handler after its graceful shutdown and re-raises the signal to it; a no-op
    # handler there turns "drained and stopped on request" into exit status 0 instead of death by SIGTERM (which, as
    # PID 1 in a container without an init, would even be ignored by the kernel).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if failures:
        log.error("exiting: the model in %s could not be loaded", cfg.model_dir)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
