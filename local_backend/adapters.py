"""LoRA adapters on the one base model: which names are loaded, and when one may leave.

Clients name adapters freely (`route@v3`); inside the model each gets a safe id (`lora_7`),
so replacing an adapter loads the new weights under a new id while jobs already running
on the old ones finish undisturbed. An unloaded or replaced adapter is only "retired" and
leaves the model once no job holds it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local_backend.errors import AdapterLoadError, GenerationFailed, ModelNotFound


@dataclass
class Adapter:
    name: str
    path: Path
    adapter_id: str
    created: int
    refs: int = 0
    retired: bool = False


class AdapterRegistry:
    """Thread-safe map of adapter names to loaded adapters, with per-adapter job counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._retired: list[Adapter] = []
        self._ids = itertools.count(1)

    def new_adapter(self, name: str, path: Path) -> Adapter:
        return Adapter(name, path, f"lora_{next(self._ids)}", int(time.time()))

    def names(self) -> list[Adapter]:
        with self._lock:
            return list(self._by_name.values())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name

    def acquire(self, name: str) -> Adapter:
        """The adapter called `name`, counted as in use until `release`."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None:
                raise ModelNotFound(f"The model or LoRA adapter '{name}' does not exist.", param="model")
            adapter.refs += 1
            return adapter

    def release(self, adapter: Adapter) -> None:
        with self._lock:
            adapter.refs -= 1

    def publish(self, adapter: Adapter) -> None:
        """Make `adapter` the one its name selects, retiring any adapter it replaces."""
        with self._lock:
            previous = self._by_name.get(adapter.name)
            if previous is not None:
                self._retire(previous)
            self._by_name[adapter.name] = adapter

    def withdraw(self, name: str) -> Adapter:
        """Stop selecting `name` (new requests get 404); the weights leave once unused."""
        with self._lock:
            adapter = self._by_name.pop(name, None)
            if adapter is None:
                raise ModelNotFound(f"The LoRA adapter '{name}' cannot be found.", param="lora_name")
            self._retire(adapter)
            return adapter

    def take_unused_retired(self) -> list[Adapter]:
        """Retired adapters no job holds any more; the caller deletes their weights."""
        with self._lock:
            unused = [a for a in self._retired if a.refs <= 0]
            self._retired = [a for a in self._retired if a.refs > 0]
            return unused

    def _retire(self, adapter: Adapter) -> None:
        adapter.retired = True
        self._retired.append(adapter)


def check_adapter_folder(path: Path) -> dict[str, Any]:
    """The adapter's peft config, or AdapterLoadError saying what is wrong with the folder."""
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise AdapterLoadError(f"LoRA adapter folder not found: {path}", param="lora_path")
    if not config_file.is_file():
        raise AdapterLoadError(f"no adapter_config.json in {path}", param="lora_path")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"unreadable adapter_config.json in {path}: {exc}", param="lora_path") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(
            f"{path} holds a {config.get('peft_type')} adapter, not LoRA", param="lora_path"
        )
    return config


@contextlib.contextmanager
def unmerged_torchao_lora() -> Iterator[None]:
    """peft's LoRA layer on a torchao (int8/int4) weight warns that merge() needs the
    quantization config: adapters here are never merged (they hot-swap), so the warning only
    alarms the log. Wrap every call that adds LoRA layers to a quantized base."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        yield


def load_into_model(model: Any, adapter: Adapter) -> None:
    """Add the adapter's weights to `model` under its id; on failure leave no trace of it."""
    try:
        with unmerged_torchao_lora():
            info = model.load_adapter(str(adapter.path), adapter_name=adapter.adapter_id, hotswap=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        delete_from_model(model, adapter.adapter_id)
        reason = "its weight shapes do not match the base model" if "mismatched" in str(exc) else str(exc)
        raise AdapterLoadError(
            f"cannot load LoRA adapter '{adapter.name}': {reason}", param="lora_path"
        ) from exc
    missing = [k for k in getattr(info, "missing_keys", ()) if f".{adapter.adapter_id}." in k]
    if missing:
        delete_from_model(model, adapter.adapter_id)
        raise AdapterLoadError(
            f"LoRA adapter '{adapter.name}' does not fit the base model (missing {missing[0]})",
            param="lora_path",
        )
    keep_trained_dtype(model, adapter.adapter_id, trained_dtype(adapter.path))
    model.eval()  # fresh LoRA modules start in training mode: dropout would be live


def trained_dtype(path: Path) -> Any:
    """The dtype the adapter's weights were saved in (None when unknown)."""
    from safetensors import safe_open

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        first = next(iter(f.keys()), None)
        return f.get_tensor(first).dtype if first is not None else None


def keep_trained_dtype(model: Any, adapter_id: str, dtype: Any) -> None:
    """peft casts a new adapter to the base weights' dtype (bf16 on a bf16 base); put it back
    in the dtype it was trained in. The LoRA path then runs in that dtype (peft casts its
    input to the adapter's and its output back), so a base served in bf16 or int8 leaves
    the adapter's own precision alone: the low-rank matmuls are a sliver of the cost."""
    if dtype is None:
        return
    for module in model.modules():
        for name in ("lora_A", "lora_B"):
            layers = getattr(module, name, None)
            if layers is not None and adapter_id in layers:
                layers[adapter_id].to(dtype)


def delete_from_model(model: Any, adapter_id: str) -> None:
    if adapter_id in (getattr(model, "peft_config", None) or {}):
        model.delete_adapter(adapter_id)


def activate(model: Any, adapter_id: str | None) -> None:
    """Make the next forward passes use `adapter_id`, or the bare base model for None."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        if adapter_id is not None:
            raise GenerationFailed(f"adapter {adapter_id} is not on the model")
        return
    if adapter_id is None:
        model.disable_adapters()
        return
    model.enable_adapters()
    model.set_adapter(adapter_id)
