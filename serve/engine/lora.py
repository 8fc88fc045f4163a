"""Many LoRA adapters on the served model at once: `LoraTree(model)`, `add(key, files)`, `generate(batch, keys)`.

    tree = LoraTree(loaded.model)
    tree.add("a1", read_adapter(folder, facts, max_rank=64))        # serve/engine/adapter_files.py
    out = tree.generate(batch, ["a1", None, "a2"], generation_config=gen, ...)   # one row per key; None: the base

The served model is never modified: adapters live on a second module tree that shares every weight of it (a deep
copy whose memo maps each tensor, and each bitsandbytes quantisation state, to itself), so base-only batches keep
the compiled decode path and their exact answers while adapters come and go. PEFT injects each adapter's LoRA
layers into that tree under an internal key, and mixes adapters within one batch through `adapter_names=` (the
base GEMM runs once for the batch, each adapter's LoRA product on its own rows; NF4 layers included). A batch whose
rows all use one adapter takes PEFT's plain path with that adapter active instead: no per-row gather and scatter.

PEFT does not route `modules_to_save` per row for LLaVA: its mixed-batch path accepts only Linear/Embedding/Conv
modules, and the projector runs on image features, not on rows. So each adapter's fully trained projector is a
copy in a `ProjectorRouter` that replaces the projector in the tree and sends each image through the projector of
its row's adapter (one image per row, which is how the predictor batches LLaVA-1.5).

An adapter whose weights name modules the model lacks, miss some of its LoRA layers, have other shapes, or change
nothing (every lora_B zero and the base projector) is refused and rolled back: the tree is as it was.
Mutations and adapter generation hold `lock`; adapter weights are kept in the model's compute dtype.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Sequence
from typing import Any

from serve.engine.adapter_files import PROJECTOR, AdapterFiles
from serve.engine.errors import ApiError

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
COMPILED_ATTRIBUTES = ("_compiled_call", "_last_compile_config")  # transformers' compiled forward: never shared


class LoraTree:
    """The adapter side of one served model. Keys are internal names (no dots: PEFT keeps them in ModuleDicts)."""

    def __init__(self, model: Any):
        self.model = model
        self.dtype = model.dtype  # the compute dtype: LoRA products and projector copies run in it
        self.lock = threading.Lock()
        self.sizes: dict[str, int] = {}  # key -> bytes of its LoRA matrices and projector copy
        self._peft: Any = None
        self._router: Any = None
        self._active: str | None = None  # PEFT's active adapter, as last set here

    # ------------------------------------------------------------------ adapters
    def add(self, key: str, files: AdapterFiles) -> int:
        """Inject the adapter under `key`; its size in bytes. ApiError (and the tree unchanged) if it does not fit."""
        with self.lock:
            base_projector = _module(self.model, PROJECTOR)
            if _changes_nothing(files, base_projector):
                raise ApiError("invalid_adapter", "the adapter changes nothing: every lora_B matrix is zero and the "
                                                  "projector (if any) equals the base model's")
            fresh = self._peft is None
            try:
                self._inject(key, files)
                projector = self._projector_copy(files, base_projector) if files.projector else None
            except BaseException as e:
                self._roll_back(key, fresh)
                raise _as_api_error(e) from None
            params = self._lora_params(key)
            if projector is not None:
                self._router.trained[key] = projector
                params += list(projector.parameters())
            self.sizes[key] = sum(p.numel() * p.element_size() for p in params)
            return self.sizes[key]

    def remove(self, key: str) -> None:
        with self.lock:
            if self._peft is None or key not in self._peft.peft_config:
                return
            self.sizes.pop(key, None)
            self._delete(key)

    @property
    def keys(self) -> list[str]:
        return list(self.sizes)

    # ------------------------------------------------------------------ generation
    def generate(self, batch: dict[str, Any], keys: Sequence[str | None], **kwargs: Any) -> Any:
        """`generate` on the adapter tree, row i with adapter `keys[i]` (None: the base model), eager."""
        with self.lock:
            if self._peft is None or any(k is not None and k not in self.sizes for k in keys) \
                    or not self._peft.has_active_enabled_adapter:
                raise RuntimeError(f"generate with adapters {sorted(set(map(str, keys)))}; resident: {self.keys}")
            self._router.assignment = _per_image(batch, keys)
            try:
                if len(set(keys)) == 1 and keys[0] is not None:  # one adapter: PEFT's plain path, no per-row split
                    self._activate(keys[0])
                    return self._peft.generate(**batch, **kwargs)
                return self._peft.generate(**batch, adapter_names=[k or BASE for k in keys], **kwargs)
            finally:
                self._router.assignment = None

    # ------------------------------------------------------------------ internals
    def _inject(self, key: str, files: AdapterFiles) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        config = lora_config(files.config)
        if self._peft is None:
            tree = share_weights_copy(self.model)
            self._router = _install_router(tree)
            self._peft = PeftModel(tree, config, adapter_name=key, autocast_adapter_dtype=False)
        else:
            self._peft.add_adapter(key, config)
        self._activate(key)  # PEFT renames loaded weights through the active adapter's config
        result = set_peft_model_state_dict(self._peft, files.lora, adapter_name=key)
        if result.unexpected_keys:
            raise ApiError("invalid_adapter", f"{len(result.unexpected_keys)} LoRA weight(s) match no module of the "
                                              f"served model (e.g. {result.unexpected_keys[0]}); loaded anyway they "
                                              "would change nothing")
        missing = [k for k in result.missing_keys if f".{key}." in k and ".lora_" in k]
        if missing:
            raise ApiError("invalid_adapter", f"the weights lack {len(missing)} of the adapter's LoRA matrices "
                                              f"(e.g. {missing[0].replace(f'.{key}.', '.')})")
        for param in self._lora_params(key):
            param.data = param.data.to(self.dtype)
            param.requires_grad_(False)
        self._peft.eval()

    def _activate(self, key: str) -> None:
        """Make `key` PEFT's active adapter (a walk over every module: only when it changes)."""
        if self._active != key or self._peft.active_adapter != key:
            self._peft.set_adapter(key, inference_mode=True)
            self._active = key

    def _lora_params(self, key: str) -> list[Any]:
        return [p for n, p in self._peft.named_parameters() if f".{key}." in n and ".lora_" in n]

    def _projector_copy(self, files: AdapterFiles, base_projector: Any) -> Any:
        projector = copy.deepcopy(base_projector)  # its own tensors, in the base projector's dtype and device
        projector.load_state_dict(files.projector, strict=True)
        return projector.eval().requires_grad_(False)

    def _roll_back(self, key: str, fresh: bool) -> None:
        if self._peft is None:
            return
        if fresh:  # the tree was made for this adapter: drop it whole
            self._peft = self._router = self._active = None
            return
        if key in self._peft.peft_config:
            self._delete(key)

    def _delete(self, key: str) -> None:
        """Remove `key` from the tree. PEFT applies adapter_names only while some adapter is active, so another one
        (if any) is made active first."""
        others = [k for k in self._peft.peft_config if k != key]
        if others:
            self._activate(others[0])
        self._peft.delete_adapter(key)
        _drop(self._router.trained, key)


def _drop(modules: Any, key: str) -> None:
    if key in modules:
        del modules[key]


def lora_config(raw: dict[str, Any]) -> Any:
    """adapter_config.json as a LoraConfig for inference, without modules_to_save (the router holds the
    projector). Keys this PEFT does not know are left out, as PeftConfig.from_pretrained does."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        log.warning("adapter_config.json keys unknown to this PEFT version, ignored: %s", ", ".join(unknown))
    values = {k: v for k, v in raw.items() if k in known and k not in ("modules_to_save", "peft_type", "task_type",
                                                                       "inference_mode")}
    return LoraConfig(**values, inference_mode=True)


def share_weights_copy(model: Any) -> Any:
    """A deep copy of `model`'s modules that shares every tensor and bitsandbytes quantisation state with it (and
    never its compiled forward)."""
    import torch

    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        memo[id(tensor)] = tensor
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) or type(value).__module__.startswith("bitsandbytes"):
                memo[id(value)] = value
            elif name in COMPILED_ATTRIBUTES:
                memo[id(value)] = None
    tree = copy.deepcopy(model, memo)
    for module in tree.modules():
        for name in COMPILED_ATTRIBUTES:
            module.__dict__.pop(name, None)
    return tree


def _module(root: Any, suffix: str) -> Any:
    for name, module in root.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return module
    raise ApiError("adapter_mismatch", f"the served model has no {suffix}")


def _install_router(tree: Any) -> Any:
    for name, module in tree.named_modules():
        if name == PROJECTOR or name.endswith("." + PROJECTOR):
            parent_name, _, attr = name.rpartition(".")
            router = projector_router(module)
            setattr(tree.get_submodule(parent_name) if parent_name else tree, attr, router)
            return router
    raise ApiError("adapter_mismatch", f"the served model has no {PROJECTOR}")


def projector_router(base: Any) -> Any:
    """A module in place of the projector that sends image i through the projector of `assignment[i]`'s adapter (the
    base projector for None or an adapter without one). Built here so importing this module needs no torch."""
    import torch

    class ProjectorRouter(torch.nn.Module):
        def __init__(self, base_projector: Any):
            super().__init__()
            self.base = base_projector
            self.trained = torch.nn.ModuleDict()
            self.assignment: list[str | None] | None = None

        def forward(self, features: Any) -> Any:
            names = self.assignment
            if not names or all(n not in self.trained for n in names):
                return self.base(features)
            if len(names) != features.shape[0]:
                raise RuntimeError(f"{features.shape[0]} images for {len(names)} adapter assignments")
            rows: dict[str | None, list[int]] = {}
            for i, name in enumerate(names):
                rows.setdefault(name if name in self.trained else None, []).append(i)
            if len(rows) == 1:
                return self._projector(next(iter(rows)))(features)
            out = None
            for name, index in rows.items():
                projected = self._projector(name)(features[index])
                if out is None:
                    out = projected.new_empty((features.shape[0], *projected.shape[1:]))
                out[index] = projected
            return out

        def _projector(self, name: str | None) -> Any:
            return self.base if name is None else self.trained[name]

    return ProjectorRouter(base)


def _per_image(batch: dict[str, Any], keys: Sequence[str | None]) -> list[str | None] | None:
    """Each image's adapter: image i is row i's when every row has one image (all rows, or one adapter for all)."""
    pixels = batch.get("pixel_values")
    if pixels is None:
        return None
    if pixels.shape[0] == len(keys):
        return list(keys)
    if len(set(keys)) == 1:
        return [keys[0]] * pixels.shape[0]
    raise RuntimeError(f"{pixels.shape[0]} images in a batch of {len(keys)} rows with different adapters")


def _changes_nothing(files: AdapterFiles, base_projector: Any) -> bool:
    if any(bool(t.any()) for k, t in files.lora.items() if ".lora_B" in k):
        return False
    if not files.projector:
        return True
    base = base_projector.state_dict()
    return all(k in base and base[k].shape == t.shape and bool((base[k].to(t.device, t.dtype) == t).all())
               for k, t in files.projector.items())


def _as_api_error(e: BaseException) -> BaseException:
    """What PEFT and torch raise for an adapter that does not fit the model, as the caller's error."""
    if isinstance(e, ApiError) or not isinstance(e, Exception):
        return e
    text = str(e)
    if isinstance(e, RuntimeError) and ("size mismatch" in text or "shape" in text):
        first = next((line.strip() for line in text.splitlines() if "size mismatch" in line), text[:300])
        return ApiError("adapter_mismatch", f"the adapter's weights have other shapes than the served model's "
                                            f"(another base or hidden size): {first}")
    if isinstance(e, (ValueError, KeyError)) and "not found in the base model" in text:
        return ApiError("adapter_mismatch", "the adapter's target_modules match no module of the served model")
    if isinstance(e, (ValueError, KeyError, TypeError)):
        log.warning("adapter refused by PEFT", exc_info=e)
        return ApiError("invalid_adapter", f"PEFT cannot apply the adapter ({type(e).__name__}: {text[:300]})")
    return e
