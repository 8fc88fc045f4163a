"""TrainConfig resolution (precedence, unknown keys, types, SageMaker defaults, blog flags), SageMaker files,
launch plans, checkpoint selection and the shipped DeepSpeed configs. Fast: no model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.checkpoints import find_resume_checkpoint
from train.config import (
    DEEPSPEED_PRESETS,
    LR_SCHEDULERS,
    ConfigError,
    deepspeed_dir,
    deepspeed_stage,
    resolve_deepspeed,
)
from train.launch import ensure_rendezvous_env, torchrun_command
from train.logs import METRIC_DEFINITIONS
from train.sagemaker_env import ResourceConfig, SageMakerConfigError, SageMakerPaths
from train.sources import resolve_config

BLOG_FLAGS = """--deepspeed ./scripts/zero2.json --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5
--bits 4 --model_name_or_path {base} --version llava_llama_2 --data_path {data} --validation_data_path {data}
--image_folder {images} --vision_tower openai/clip-vit-large-patch14-336 --mm_projector_type mlp2x_gelu
--mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad
--group_by_modality_length True --bf16 True --output_dir {out} --num_train_epochs 500
--per_device_train_batch_size 32 --per_device_eval_batch_size 32 --gradient_accumulation_steps 1
--evaluation_strategy epoch --save_strategy steps --save_steps 50000 --save_total_limit 1 --learning_rate 2e-4
--weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --tf32 True
--model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True
--report_to wandb"""


@pytest.fixture
def files(tmp_path):
    """A data file, an image folder and a base dir: config validation checks that they exist."""
    data = tmp_path / "data.json"
    data.write_text("[]")
    (tmp_path / "images").mkdir()
    (tmp_path / "base").mkdir()
    return {"data": str(data), "images": str(tmp_path / "images"), "base": str(tmp_path / "base"),
            "out": str(tmp_path / "out")}


@pytest.fixture
def no_sagemaker(tmp_path):
    return SageMakerPaths(tmp_path / "no-sagemaker")


def required(files) -> list[str]:
    return ["--model_name_or_path", files["base"], "--data_path", files["data"], "--output_dir", files["out"]]


def write_hyperparameters(base: Path, values: dict[str, str]) -> SageMakerPaths:
    paths = SageMakerPaths(base)
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.hyperparameters_file.write_text(json.dumps(values))
    return paths


def test_precedence_defaults_yaml_hyperparameters_cli(tmp_path, files):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("learning_rate: 1.0e-3\nlora_r: 8\nlora_alpha: 32\nnum_train_epochs: 2\n")
    paths = write_hyperparameters(tmp_path / "ml", {"lora_r": "16", "lora_alpha": "64", "data_path": json.dumps(
        files["data"]), "model_name_or_path": files["base"]})
    resolved = resolve_config(["--config", str(yaml_file), "--lora_alpha", "128"], paths)
    cfg = resolved.config
    assert cfg.warmup_ratio == 0.03  # default
    assert cfg.learning_rate == 1e-3 and cfg.num_train_epochs == 2.0  # yaml
    assert cfg.lora_r == 16  # hyperparameters.json beats yaml
    assert cfg.lora_alpha == 128  # command line beats both
    assert resolved.sources["learning_rate"].startswith("config file")
    assert resolved.sources["lora_r"] == "hyperparameters.json"
    assert resolved.sources["lora_alpha"] == "command line"


def test_unknown_keys_from_every_source_are_named_at_once(tmp_path, files):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lora_rank: 8\n")
    paths = write_hyperparameters(tmp_path / "ml", {"epochs": "3", "sagemaker_program": "x"})
    with pytest.raises(ConfigError) as err:
        resolve_config(["--config", str(yaml_file), "--lr", "1e-3", *required(files)], paths)
    problems = "\n".join(err.value.problems)
    assert "--lr (from command line): unknown setting" in problems
    assert "lora_rank (from config file" in problems and "unknown setting; did you mean 'lora_r'?" in problems
    assert "epochs (from hyperparameters.json): unknown setting; did you mean 'num_train_epochs'?" in problems
    assert "sagemaker_program" not in problems  # keys the SageMaker SDK adds are not the user's


def test_types_and_booleans(no_sagemaker, files):
    cfg = resolve_config([*required(files), "--lora_enable", "--bf16", "false", "--bits", "4",
                          "--mm_projector_lr", "none", "--num_train_epochs", "3"], no_sagemaker).config
    assert cfg.lora_enable is True and cfg.bf16 is False and cfg.bits == 4 and cfg.mm_projector_lr is None
    with pytest.raises(ConfigError) as err:
        resolve_config([*required(files), "--lora_r", "eight", "--bf16", "maybe", "--bits", "3"], no_sagemaker)
    problems = "\n".join(err.value.problems)
    assert "lora_r (from command line): expected an integer, got 'eight'" in problems
    assert "bf16 (from command line): expected true or false" in problems
    assert "bits (from command line): must be one of 4, 8, 16, got 3" in problems
    with pytest.raises(ConfigError, match="argument --bits: expected one argument"):
        resolve_config([*required(files), "--bits"], no_sagemaker)


def test_blog_command_line_is_accepted_with_notes_and_refusals(files, no_sagemaker):
    argv = BLOG_FLAGS.format(**files).split()
    resolved = resolve_config(argv, no_sagemaker)
    cfg = resolved.config
    assert cfg.bits == 4 and cfg.lora_r == 128 and cfg.mm_projector_lr == 2e-5 and cfg.evaluation_strategy == "epoch"
    assert cfg.deepspeed == str(deepspeed_dir() / "zero2.json")
    notes = "\n".join(resolved.notes)
    assert "./scripts/zero2.json does not exist; using the shipped" in notes
    assert "--lazy_preprocess has no effect" in notes
    with pytest.raises(ConfigError) as err:
        resolve_config([*argv, "--deepspeed", "zero3", "--mm_use_im_start_end", "True"], no_sagemaker)
    problems = "\n".join(err.value.problems)
    assert "--bits 4 with ZeRO-3 is refused" in problems
    assert "--mm_use_im_start_end True is not supported" in problems


def test_config_problems_are_reported_together(no_sagemaker, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_config(["--bits", "8", "--evaluation_strategy", "steps", "--image_aspect_ratio", "anyres",
                        "--data_path", str(tmp_path / "missing.json"), "--version", "v9",
                        "--attn_implementation", "xformers"], no_sagemaker)
    problems = "\n".join(err.value.problems)
    for expected in ("model_name_or_path is required", "output_dir is required", "missing.json is not a file",
                     "--bits 8 needs --lora_enable True", "needs --validation_data_path",
                     "image_aspect_ratio (from command line): must be one of pad, crop, square, got 'anyres'",
                     "version (from command line): must be one of llava_llama_2, plain, v1, vicuna_v1, got 'v9'",
                     "attn_implementation (from command line): must be one of sdpa, eager, flash_attention_2, "
                     "got 'xformers'"):
        assert expected in problems


def test_fake_sagemaker_tree_with_string_hyperparameters(tmp_path, tiny_artifact):
    base = tmp_path / "ml"
    paths = write_hyperparameters(base, {"lora_enable": "true", "lora_r": "8", "learning_rate": "2e-4",
                                         "max_steps": "10", "output_dir": "/somewhere/else"})
    for channel, name in (("train", "train.jsonl"), ("validation", "val.json")):
        (base / "input" / "data" / channel).mkdir(parents=True)
        (base / "input" / "data" / channel / name).write_text("[]")
    (base / "input" / "data" / "model").symlink_to(tiny_artifact)
    resolved = resolve_config([], paths)
    cfg = resolved.config
    assert cfg.lora_enable is True and cfg.lora_r == 8 and cfg.learning_rate == 2e-4 and cfg.max_steps == 10
    assert cfg.data_path == str(base / "input" / "data" / "train" / "train.jsonl")
    assert cfg.validation_data_path == str(base / "input" / "data" / "validation" / "val.json")
    assert cfg.model_name_or_path == str(base / "input" / "data" / "model")
    assert cfg.output_dir == str(base / "model") and cfg.checkpoint_dir == str(base / "checkpoints")
    assert any("/somewhere/else is not used in a SageMaker job" in n for n in resolved.notes)
    assert resolved.sources["data_path"] == "SageMaker channel 'train'"
    # No images channel: images sit beside the data file.
    assert cfg.image_folder == str(base / "input" / "data" / "train")


def test_images_channel_is_the_image_folder(tmp_path, tiny_artifact):
    base = tmp_path / "ml"
    paths = write_hyperparameters(base, {"max_steps": "1"})
    for channel in ("train", "images"):
        (base / "input" / "data" / channel).mkdir(parents=True)
    (base / "input" / "data" / "train" / "train.json").write_text("[]")
    (base / "input" / "data" / "model").symlink_to(tiny_artifact)
    resolved = resolve_config([], paths)
    assert resolved.config.image_folder == str(base / "input" / "data" / "images")
    assert resolved.sources["image_folder"] == "SageMaker channel 'images'"


def test_outside_sagemaker_checkpoints_go_to_output_dir(no_sagemaker, files):
    cfg = resolve_config(required(files), no_sagemaker).config
    assert cfg.checkpoint_dir == files["out"] and cfg.image_folder == str(Path(files["data"]).parent)


def test_malformed_sagemaker_files_are_user_errors(tmp_path):
    paths = SageMakerPaths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.hyperparameters_file.write_text("{not json")
    with pytest.raises(SageMakerConfigError, match="cannot read"):
        paths.read_hyperparameters()
    paths.resource_config_file.write_text(json.dumps({"current_host": "algo-3", "hosts": ["algo-1"]}))
    with pytest.raises(SageMakerConfigError, match="not among hosts"):
        paths.read_resource_config()


def test_failure_file_is_one_paragraph_within_the_limit(tmp_path):
    path = SageMakerPaths(tmp_path).write_failure("first line\nsecond " + "x" * 2000)
    text = path.read_text()
    assert "\n" not in text and len(text) == 1024 and text.startswith("first line second")



def test_the_first_failure_reason_stays(tmp_path):
    """One rank's error, then torchrun's SIGTERM to the others: SageMaker must show the error."""
    paths = SageMakerPaths(tmp_path)
    paths.write_failure("rank 1: Training failed (RuntimeError): CUDA error: an illegal memory access")
    paths.write_failure("Stopped by SIGTERM before finishing; a new run resumes from the newest checkpoint")
    assert paths.failure_file.read_text().startswith("rank 1: Training failed (RuntimeError)")

    paths.clear_failure()  # what a new job does first, before any rank starts
    paths.write_failure("Invalid input: --lora_r must be positive")
    assert paths.failure_file.read_text() == "Invalid input: --lora_r must be positive"


def test_torchrun_plans():
    two_hosts = ResourceConfig("algo-2", ["algo-1", "algo-2"], "eth1")
    cmd = torchrun_command(["--lora_enable", "True"], gpus=4, resource=two_hosts, env={})
    assert "--nnodes=2" in cmd and "--nproc_per_node=4" in cmd and "--node_rank=1" in cmd
    assert "--master_addr=algo-1" in cmd and cmd[-4:] == ["-m", "train", "--lora_enable", "True"]
    one_host = torchrun_command([], gpus=8, resource=ResourceConfig("algo-1", ["algo-1"]), env={})
    assert "--standalone" in one_host and "--nproc_per_node=8" in one_host
    assert "--shutdown-timeout=100" in one_host  # ranks get most of SageMaker's 120 s to save a checkpoint
    assert torchrun_command([], gpus=1, resource=None, env={}) is None
    assert torchrun_command([], gpus=8, resource=None, env={"LOCAL_RANK": "0"}) is None  # already launched
    env: dict[str, str] = {}
    ensure_rendezvous_env(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0


def test_deepspeed_presets_are_package_data_beside_the_code():
    """Each preset name resolves to a file inside the imported train package (what a wheel installs), not to a path
    relative to the working directory or the source checkout; tests/test_wheel.py repeats this from a wheel."""
    import train

    for name in DEEPSPEED_PRESETS:
        path, note = resolve_deepspeed(name)
        assert note is None
        assert Path(path) == Path(train.__file__).parent / "deepspeed" / f"{name}.json"
        assert Path(path).is_file()


def test_shipped_deepspeed_configs():
    stages = {p.stem: deepspeed_stage(str(p)) for p in deepspeed_dir().glob("*.json")}
    assert stages == DEEPSPEED_PRESETS  # the stages TrainConfig.problems knows without reading the files
    offload = json.loads((deepspeed_dir() / "zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu" and offload["offload_param"]["device"] == "cpu"
    zero3 = json.loads((deepspeed_dir() / "zero3.json").read_text())["zero_optimization"]
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True  # else the final save has no weights


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    def checkpoint(step: int, *, state=True, weights=True, ds_missing=False):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if weights:
            (d / "adapter_model.safetensors").write_bytes(b"x")
        if ds_missing:
            (d / "latest").write_text(f"global_step{step}")

    checkpoint(2)
    checkpoint(10)
    checkpoint(12, weights=False)  # killed while saving
    checkpoint(14, state=False)
    checkpoint(16, ds_missing=True)  # DeepSpeed engine state not synced
    (tmp_path / "checkpoint-x").mkdir()
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert find_resume_checkpoint(tmp_path / "absent") is None


def test_metric_definitions_fit_sagemaker_limits():
    assert len(METRIC_DEFINITIONS) <= 40
    assert all(len(d["Regex"]) <= 500 and len(d["Name"]) <= 255 for d in METRIC_DEFINITIONS)
    names = {d["Name"] for d in METRIC_DEFINITIONS}
    assert {"loss", "learning_rate", "epoch", "grad_norm", "train_runtime", "train_samples_per_second",
            "train_steps_per_second", "train_loss", "eval_loss", "eval_accuracy"} <= names


def test_flash_attention_without_the_package_is_refused_up_front(no_sagemaker, files):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        resolve_config(required(files) + ["--attn_implementation", "flash_attention_2"], no_sagemaker)
    assert resolve_config(required(files) + ["--attn_implementation", "eager"], no_sagemaker).config \
        .attn_implementation == "eager"


def test_unknown_lr_scheduler_is_a_config_error_and_the_list_matches_transformers(no_sagemaker, files):
    from transformers.trainer_utils import SchedulerType

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    with pytest.raises(ConfigError, match=r"lr_scheduler_type \(from command line\): must be one of linear, "
                                          r"cosine, .*got 'bogus'"):
        resolve_config(required(files) + ["--lr_scheduler_type", "bogus"], no_sagemaker)
    assert resolve_config(required(files) + ["--lr_scheduler_type", "linear"], no_sagemaker).config \
        .lr_scheduler_type == "linear"


@pytest.mark.parametrize("flags, problem", [
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "lowers the learning rate from the validation loss: it needs "
                                                      "--evaluation_strategy"),
    (["--lr_scheduler_type", "greedy"], "greedy lowers the learning rate from the validation loss"),
    (["--lr_scheduler_type", "warmup_stable_decay"], "missing 1 required positional argument: 'num_decay_steps'; "
                                                     "e.g. --lr_scheduler_kwargs '{\"num_decay_steps\": 100}'"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "min_lr or min_lr_rate should be set"),
    (["--lr_scheduler_type", "cosine_warmup_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_ratee": 0.1}'],
     "unexpected keyword argument 'min_lr_ratee'"),
    (["--lr_scheduler_kwargs", '{"bogus": 1}'], "lr_scheduler_type cosine with lr_scheduler_kwargs {\"bogus\": 1}"),
    (["--lr_scheduler_kwargs", "{min_lr: 1}"], "lr_scheduler_kwargs (from command line): not valid JSON"),
    (["--lr_scheduler_kwargs", "[1, 2]"], "expected a JSON object"),
])
def test_scheduler_settings_transformers_would_refuse_mid_run_are_config_errors(no_sagemaker, files, flags, problem):
    """Each of these passed validation once and then failed with exit 1 after the model was loaded."""
    with pytest.raises(ConfigError) as e:
        resolve_config(required(files) + flags, no_sagemaker)
    assert problem in str(e.value)


def test_scheduler_arguments_from_every_source(tmp_path, files):
    cli = required(files) + ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs",
                             '{"min_lr_rate": 0.1}']
    assert resolve_config(cli, SageMakerPaths(tmp_path / "none")).config.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    paths = write_hyperparameters(tmp_path / "ml", {"lr_scheduler_type": "warmup_stable_decay",
                                                    "lr_scheduler_kwargs": '{"num_decay_steps": 10}'})
    assert resolve_config(required(files), paths).config.lr_scheduler_kwargs == {"num_decay_steps": 10}
    config = tmp_path / "c.yaml"
    config.write_text("lr_scheduler_type: polynomial\nlr_scheduler_kwargs:\n  power: 2.0\n")
    resolved = resolve_config(required(files) + ["--config", str(config)], SageMakerPaths(tmp_path / "none"))
    assert resolved.config.lr_scheduler_kwargs == {"power": 2.0}


def test_numbers_the_trainer_would_crash_on_or_silently_misread_are_refused(no_sagemaker, files):
    """A negative seed or worker count crashed after the model loaded; a negative eval_max_samples dropped the last
    example, save_total_limit 0 kept every checkpoint, a negative weight decay grew the weights."""
    with pytest.raises(ConfigError) as err:
        resolve_config(required(files) + ["--seed", "-1", "--dataloader_num_workers", "-1", "--eval_max_samples",
                                          "-1", "--save_total_limit", "0", "--eval_steps", "0", "--weight_decay",
                                          "-0.1", "--max_grad_norm", "-1"], no_sagemaker)
    problems = "\n".join(err.value.problems)
    for expected in ("seed (from command line): must be >= 0 and < 4294967296, got -1",
                     "dataloader_num_workers (from command line): must be >= 0, got -1",
                     "eval_max_samples (from command line): must be >= 0, got -1",
                     "save_total_limit (from command line): must be >= 1, got 0",
                     "eval_steps (from command line): must be >= 1, got 0",
                     "weight_decay (from command line): must be >= 0, got -0.1",
                     "max_grad_norm (from command line): must be >= 0, got -1.0"):
        assert expected in problems
    with pytest.raises(ConfigError, match=r"seed \(from command line\): must be >= 0 and < 4294967296, got 42949"):
        resolve_config(required(files) + ["--seed", str(2**32)], no_sagemaker)
    ok = resolve_config(required(files) + ["--seed", "0", "--save_total_limit", "None", "--max_grad_norm", "0"],
                        no_sagemaker).config
    assert (ok.seed, ok.save_total_limit, ok.max_grad_norm) == (0, None, 0.0)


def test_bf16_is_refused_on_a_gpu_without_it_before_loading():
    from train.job import bf16_problem

    problem = bf16_problem(True, (7, 5), "Tesla T4")
    assert problem and "Tesla T4 has 7.5" in problem and "--fp16 True" in problem
    assert bf16_problem(True, (7, 0), "Tesla V100-SXM2-16GB")
    assert bf16_problem(True, (8, 6), "NVIDIA A10G") is None and bf16_problem(True, (9, 0), "NVIDIA H100") is None
    assert bf16_problem(True, None, None) is None  # CPU: bf16 runs there
    assert bf16_problem(False, (7, 5), "Tesla T4") is None
