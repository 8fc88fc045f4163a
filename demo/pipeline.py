"""The offline end-to-end demo (`bash scripts/demo.sh`): synthetic charts -> a small LLaVA -> fine-tune -> serve ->
ask through the client -> evaluation table for the untrained and the fine-tuned model, with the blank-image control.

    python -m demo [--workdir runs/demo] [--quick] [--steps 1800] [--charts 1700] [--lora]

Every stage runs the project's real entry point as a subprocess, exactly as a user would type it:
    1 data      python -m datagen DIR --preset demo              (96 px charts, one-word titles, fruit labels)
    2 base      python -m demo.tiny DIR --preset demo --corpus data/corpus.txt   (a from-scratch 1.1 M LLaVA)
    3 untrained python -m client.cli eval --model-dir base       (the score to beat)
    4 train     python -m train ...                              (full fine-tuning, or --lora: LoRA then merge)
    5 serve     python -m serve                                  (SM_MODEL_DIR=model, on 127.0.0.1)
    6 ask       client.predict(...) for a few held-out charts
    7 eval      python -m client.cli eval --url ...              (fine-tuned, and the same questions on a grey image)
The recipe (../docs/demo.md) is sized to learn chart type, title and colour on 2 CPU cores in about 8 minutes.
--quick runs every stage with a handful of charts and steps (CI): it proves the wiring, not the learning, so the
final accuracy checks are skipped. Exit status: 0 when every stage worked (and, without --quick, the fine-tuned
model beat the untrained one and lost accuracy on blank images), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Question types where the answer must come from the picture: the blank-image control must hurt these.
VISUAL_TYPES = ("chart_type", "color")


@dataclass
class DemoConfig:
    workdir: str = "runs/demo"
    charts: int = 1700              # 12% held out by chart
    val_fraction: float = 0.12
    eval_limit: int | None = 600    # held-out questions asked per run (None: all)
    steps: int = 1800
    batch_size: int = 32
    learning_rate: float = 1e-3
    lora: bool = False              # LoRA on the language model (merged into the artifact) instead of full training
    seed: int = 0
    quick: bool = False
    python: str = sys.executable
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def quick_preset(cls, **overrides) -> DemoConfig:
        """Every stage with a handful of charts and steps: CI's check of the wiring (about a minute or two)."""
        return cls(**{"charts": 16, "val_fraction": 0.25, "eval_limit": 8, "steps": 3, "batch_size": 4,
                      "quick": True, **overrides})


# ---- a real server in the background ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: str | Path, *, python: str = sys.executable, log_path: str | Path | None = None,
                   timeout_s: float = 300.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python -m serve` on a free loopback port, serving `model_dir`; yields its base URL once /ping answers 200."""
    port = free_port()
    server_env = {**os.environ, "SM_MODEL_DIR": str(model_dir), "SERVE_HOST": "127.0.0.1",
                  "SAGEMAKER_BIND_TO_PORT": str(port), **(env or {})}
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([python, "-m", "serve"], env=server_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc, timeout_s, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()


def wait_until_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180,
                     log_path: str | Path | None = None) -> None:
    """Poll `url`/ping until it answers 200; RuntimeError (with the log's tail) if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_path).read_text()[-2000:] if log_path else ""
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready\n{tail}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready after {timeout_s:.0f} s")


# ---- stages ----------------------------------------------------------------------------------------------------

def stage(cfg: DemoConfig, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run one entry point, its output streaming to ours; a failure stops the demo with the command shown."""
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    started = time.monotonic()
    result = subprocess.run([cfg.python, *argv], env={**os.environ, **(env or {})})
    cfg.timings[name] = round(time.monotonic() - started, 1)
    if result.returncode != 0:
        raise RuntimeError(f"stage {name!r} failed with exit status {result.returncode}: {' '.join(argv)}")


def train_argv(cfg: DemoConfig, work: Path) -> list[str]:
    """The training command: the demo recipe expressed in the trainer's own flags (docs/training.md)."""
    data = work / "data"
    argv = ["-m", "train", "--model_name_or_path", str(work / "base"), "--version", "plain",
            "--data_path", str(data / "train" / "dataset.json"), "--image_folder", str(data / "images"),
            "--output_dir", str(work / "model"), "--max_steps", str(cfg.steps),
            "--per_device_train_batch_size", str(cfg.batch_size), "--learning_rate", str(cfg.learning_rate),
            "--weight_decay", "0.01", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
            "--gradient_checkpointing", "False", "--save_strategy", "no", "--resume", "False",
            "--logging_steps", str(max(1, min(50, cfg.steps // 10))), "--eval_generation", "False",
            "--seed", str(cfg.seed)]
    if cfg.lora:
        argv += ["--lora_enable", "True", "--lora_r", "64", "--lora_alpha", "128", "--lora_dropout", "0.0"]
    return argv


def eval_argv(cfg: DemoConfig, work: Path, name: str, out: str, source: list[str], *extra: str) -> list[str]:
    argv = ["-m", "client.cli", "eval", "--data", str(work / "data" / "validation" / "dataset.json"),
            "--name", name, "--out-dir", str(work / out), *source, *extra]
    return argv + (["--limit", str(cfg.eval_limit)] if cfg.eval_limit else [])


def ask_examples(url: str, work: Path, n: int = 4) -> None:
    """A few questions through the client library, printed with the expected answers."""
    from client import predict

    records = json.loads((work / "data" / "validation" / "dataset.json").read_text())[:n]
    print("\n=== ask: client.predict(image, question, url=...)")
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        answer = predict(work / "data" / "images" / record["image"], question, url=url, temperature=0.0)
        print(f"  {record['image']}: {question!r} -> {answer!r} (expected {record['conversations'][1]['value']!r})")


def verdict(report: dict, *, names: tuple[str, str, str]) -> list[tuple[str, bool]]:
    """The demo's claims, each with whether this run bears it out."""
    untrained, tuned, blank = (report["runs"][n] for n in names)
    checks = [(f"fine-tuned beats untrained overall: {tuned['overall']['accuracy']:.2f} vs "
               f"{untrained['overall']['accuracy']:.2f}",
               tuned["overall"]["accuracy"] > untrained["overall"]["accuracy"] + 0.1)]
    for qtype in VISUAL_TYPES:
        with_image = tuned["groups"].get("question_type", {}).get(qtype)
        without = blank["groups"].get("question_type", {}).get(qtype)
        if with_image and without:
            checks.append((f"{qtype} needs the image: {with_image['accuracy']:.2f} -> {without['accuracy']:.2f} "
                           f"with a grey image", with_image["accuracy"] > without["accuracy"] + 0.1))
    return checks


def run_demo(cfg: DemoConfig) -> int:
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    started = time.monotonic()
    synth = ["-m", "datagen", str(work / "data"), "--preset", "demo", "-n", str(cfg.charts),
             "--val-fraction", str(cfg.val_fraction), "--seed", str(cfg.seed), "--overwrite"]
    stage(cfg, "data", synth + (["--quiet"] if cfg.quick else []))
    stage(cfg, "base", ["-m", "demo.tiny", str(work / "base"), "--preset", "demo", "--version", "plain",
                        "--corpus", str(work / "data" / "corpus.txt"), "--seed", str(cfg.seed)])
    stage(cfg, "untrained", eval_argv(cfg, work, "untrained", "eval-untrained",
                                      ["--model-dir", str(work / "base")], "--no-blank"))
    stage(cfg, "train", train_argv(cfg, work))
    print("\n=== serve: python -m serve (SM_MODEL_DIR=model)", flush=True)
    serve_started = time.monotonic()
    with running_server(work / "model", python=cfg.python, log_path=work / "server.log") as url:
        cfg.timings["serve"] = round(time.monotonic() - serve_started, 1)
        print(f"  ready at {url} (log: {work / 'server.log'})")
        ask_examples(url, work)
        stage(cfg, "eval", eval_argv(cfg, work, "fine-tuned", "eval", ["--url", url], "--compare",
                                     str(work / "eval-untrained" / "eval.json")))
    cfg.timings["total"] = round(time.monotonic() - started, 1)
    report = json.loads((work / "eval" / "eval.json").read_text())
    checks = verdict(report, names=("untrained", "fine-tuned", "fine-tuned (blank image)"))
    print("\n=== verdict" + (" (--quick: wiring only, not judged)" if cfg.quick else ""))
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'NO'}] {text}")
    print("  stage seconds: " + ", ".join(f"{k} {v}" for k, v in cfg.timings.items()))
    summary = {"config": {k: v for k, v in asdict(cfg).items() if k != "timings"}, "seconds": cfg.timings,
               "checks": [{"claim": t, "ok": ok} for t, ok in checks], "table": (work / "eval" / "eval.md").read_text()}
    (work / "demo_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if cfg.quick or all(ok for _, ok in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where data, models, logs and reports go")
    parser.add_argument("--quick", action="store_true", help="every stage, a few charts and steps (CI)")
    parser.add_argument("--charts", type=int, help="charts to synthesize (default 1700; --quick 16)")
    parser.add_argument("--steps", type=int, help="training steps (default 1800; --quick 3)")
    parser.add_argument("--eval-limit", type=int, help="held-out questions per evaluation (default 600)")
    parser.add_argument("--lora", action="store_true", help="LoRA on the language model instead of full training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"workdir": args.workdir, "charts": args.charts, "steps": args.steps,
                                   "eval_limit": args.eval_limit, "lora": args.lora, "seed": args.seed}.items()
                 if v is not None}
    cfg = DemoConfig.quick_preset(**overrides) if args.quick else DemoConfig(**overrides)
    try:
        return run_demo(cfg)
    except RuntimeError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
