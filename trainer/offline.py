"""The environment that keeps every Understudy process off the network, set in one place.

The gateway, the local backend and the trainer (the package the other two both import, so
this lives here) call `enforce_offline()` before importing transformers, datasets or litellm:
no model hub, no dataset hub, no price-map download. A value already in the environment wins,
so an operator can still opt in.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "TOKENIZERS_PARALLELISM": "false",
    # outlines' mask kernel would otherwise compile for up to half a minute on first use
    "TORCHDYNAMO_DISABLE": "1",
}


def enforce_offline(environ: MutableMapping[str, str] = os.environ) -> None:
    for key, value in OFFLINE_ENV.items():
        environ.setdefault(key, value)
