"""The adapter export (`--export adapter|both`): the LoRA adapter and its trained projector, ready for an adapter
inference component, and proven to change the model.

    OUT/adapter/         a PEFT folder: `PeftModel.from_pretrained(base, OUT/adapter)` loads it on the base it was
                         trained on. adapter_config.json, adapter_model.safetensors (the LoRA matrices and the fully
                         trained projector, modules_to_save), base_model.json (what the server checks the base
                         against), the processor files (chat template, tokenizer, image processing) and
                         training_config.json
    OUT/adapter.tar.gz   the same files at the archive's root: upload it and name it in `llava-sm adapter add`

The self-check loads the exported folder onto the base in memory and compares the logits of a probe (a grey image and
a question) with the base's: an adapter that leaves them unchanged (keys that match no module load silently in
PEFT, an untrained lora_B) fails the job instead of shipping a no-op.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARCHIVE = "adapter.tar.gz"
LEFT_OUT = ("training_args.bin",)  # the Trainer's pickled arguments: not needed to serve, and not safe to unpickle
PROBE_QUESTION = "What is shown in the image?"


class AdapterExportError(RuntimeError):
    """The exported adapter does not change the model."""


def export_adapter(model: Any, processor: Any, adapter_dir: Path, out_dir: Path) -> Path:
    """Complete `adapter_dir` (the Trainer's final adapter), check it against `model` (its unquantised base, left
    as it was), and pack it; returns the archive's path."""
    from serve.engine.adapter_files import BASE_FACTS_FILE, base_facts

    processor.save_pretrained(adapter_dir)
    (adapter_dir / BASE_FACTS_FILE).write_text(json.dumps(base_facts(model.config), indent=2, sort_keys=True) + "\n")
    difference = logits_difference(model, processor, adapter_dir)
    if difference == 0.0:
        raise AdapterExportError(f"the adapter in {adapter_dir} does not change the model: on a probe image and "
                                 "question its logits equal the base model's (its weights match no module, or "
                                 "training left them at their initial values)")
    log.info("adapter self-check: the probe's logits move by up to %.3g from the base's", difference)
    archive = pack(adapter_dir, out_dir / ARCHIVE)
    log.info("adapter exported: %s (%s, %.1f MiB)", adapter_dir, archive, archive.stat().st_size / 2**20)
    return archive


def logits_difference(model: Any, processor: Any, adapter_dir: Path) -> float:
    """Largest absolute difference between the probe's logits with the exported adapter and without it. `model`
    takes the adapter for the comparison and is given back unchanged."""
    import torch
    from peft import PeftModel

    inputs = probe_inputs(model, processor)
    with torch.inference_mode():
        base = model(**inputs).logits.float()
    tuned_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    try:
        with torch.inference_mode():
            tuned = tuned_model(**inputs).logits.float()
    finally:
        tuned_model.unload()  # the base again: the merge and the report use it
        model.__dict__.pop("peft_config", None)  # unload leaves it behind; PEFT would take the base for a PEFT model
    return float((tuned - base).abs().max())


def probe_inputs(model: Any, processor: Any) -> dict[str, Any]:
    """A grey image and a question, encoded as the server encodes requests."""
    from PIL import Image

    from serve.engine.encoding import Encoder

    inputs = Encoder(processor).encode(PROBE_QUESTION, Image.new("RGB", (64, 64), (128, 128, 128)))
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def pack(folder: Path, archive: Path) -> Path:
    """The folder's files at the root of a .tar.gz (what an adapter inference component's ArtifactUrl points at)."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in LEFT_OUT:
                tar.add(path, arcname=path.name)
    partial.replace(archive)
    return archive
