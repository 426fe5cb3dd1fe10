"""The app's own lifecycle: what `understudy serve` does once it has started."""

from __future__ import annotations

import gc
from pathlib import Path

from gateway.app import create_app
from gateway.settings import load_settings


async def test_serve_freezes_what_exists_at_start_out_of_the_collector(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n")
    settings = load_settings(config, environ={}, data_dir=tmp_path / "data", local={"enabled": False})
    for freeze in (False, True):
        gc.unfreeze()
        app = create_app(settings, freeze_gc=freeze)
        try:
            async with app.web.router.lifespan_context(app.web):
                assert (gc.get_freeze_count() > 0) is freeze
        finally:
            gc.unfreeze()
