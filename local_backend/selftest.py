"""Start-up self-test: can this library stack serve a LoRA adapter at all?

Once the base model has loaded, a throwaway LoRA (rank 1, on one linear layer, random
weights) is added in memory, made active the way a request's adapter is, and the next
token's logits are computed with it; then again with adapters disabled, as for a request
to the base model; then the LoRA is removed and the layer it wrapped put back. A stack
whose transformers and peft do not work together (transformers 5.24 with peft 0.21.2
refuses every adapter call: "The version of PEFT you are using is not compatible") fails
here, at start-up, and `/health` says why, instead of every adapter request failing later
while a route waits for an adapter that can never answer.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any

import torch

from local_backend import adapters

logger = logging.getLogger(__name__)

SELFTEST_ADAPTER = "understudy_selftest"
_PROMPT = "The capital of France is"


class SelfTestFailed(RuntimeError):
    """The stack ran, but a LoRA adapter did not behave as one must."""


@dataclass(frozen=True)
class SelfTestResult:
    ok: bool
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The `lora_selftest` member of `/health`."""
        return {"ok": True} if self.ok else {"ok": False, "error": self.error}


def lora_self_test(model: Any, tokenizer: Any) -> SelfTestResult:
    """Run the self-test on a freshly loaded model, before any adapter is loaded on it.
    Never raises: a failure is the result, logged at ERROR with its message."""
    try:
        _generate_with_throwaway_lora(model, tokenizer)
    except Exception as exc:  # whatever breaks is the finding: report it, keep serving the base model
        error = f"{type(exc).__name__}: {exc}"
        logger.error(
            "LoRA self-test failed, so LoRA adapters cannot be served (transformers %s, peft %s): %s",
            _version("transformers"),
            _version("peft"),
            error,
        )
        return SelfTestResult(ok=False, error=error)
    logger.info("LoRA self-test passed")
    return SelfTestResult(ok=True)


def _generate_with_throwaway_lora(model: Any, tokenizer: Any) -> None:
    ids = _prompt_ids(model, tokenizer)
    base = _next_token_logits(model, ids)
    target = _first_linear_layer(model)
    try:
        with adapters.unmerged_torchao_lora():
            model.add_adapter(_throwaway_config(target), adapter_name=SELFTEST_ADAPTER)
        adapters.activate(model, SELFTEST_ADAPTER)
        tuned = _next_token_logits(model, ids)
        adapters.activate(model, None)
        plain = _next_token_logits(model, ids)
    finally:
        _remove_throwaway(model, target)
    if torch.equal(tuned, base):
        raise SelfTestFailed("an active LoRA adapter did not change the model's output")
    if not torch.allclose(plain, base, rtol=1e-3, atol=1e-3):
        raise SelfTestFailed("with adapters disabled the model's output is not the base model's")


def _throwaway_config(target: str) -> Any:
    from peft import LoraConfig

    # Random A and B (not peft's zero B), so that the adapter visibly changes the output.
    return LoraConfig(r=1, lora_alpha=1, target_modules=[target], init_lora_weights=False)


def _first_linear_layer(model: Any) -> str:
    """The full name of the first linear layer other than the output head."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            return str(name)
    raise SelfTestFailed("the model has no linear layer a LoRA adapter could wrap")


def _prompt_ids(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = list(tokenizer(_PROMPT, add_special_tokens=False)["input_ids"])[:8]
    if not ids:
        ids = [tokenizer.eos_token_id or 0]
    return torch.tensor([ids], device=model.device)


def _next_token_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float()


def _remove_throwaway(model: Any, target: str) -> None:
    """Delete the adapter and unwrap the layer it wrapped, leaving the model as it was."""
    adapters.delete_from_model(model, SELFTEST_ADAPTER)
    if getattr(model, "peft_config", None):
        return  # the adapter is still there (its deletion failed): leave its wrapper too
    # An add_adapter that failed half-way leaves the "adapters loaded" flag set with none.
    model._hf_peft_config_loaded = False
    parent_name, _, child_name = target.rpartition(".")
    parent = model.get_submodule(parent_name)
    wrapper = getattr(parent, child_name)
    if hasattr(wrapper, "get_base_layer"):
        setattr(parent, child_name, wrapper.get_base_layer())


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
