"""The first start's GGUF conversion says what it does: stage lines and a tensor count in a
log (a bar on a terminal), instead of ~15 s of silence."""

from __future__ import annotations

from pathlib import Path

import pytest

from local_backend.loading import DEFAULT_MODEL, ensure_dense, resolve


@pytest.mark.slow
def test_conversion_reports_progress_in_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    converted = ensure_dense(resolve(DEFAULT_MODEL), tmp_path)
    assert (converted.folder / "config.json").is_file()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("converting ")]
    title = f"converting {DEFAULT_MODEL} to safetensors (first start only)"
    assert lines[:4] == [
        f"{title} ...",
        f"{title}: 0 tensors (reading the tokenizer)",
        f"{title}: 0 tensors (dequantizing)",
        f"{title}: 272/272 tensors (saving)",
    ]
    assert lines[-1].startswith(f"{title}: done in ")
    assert "Loading weights" not in err and "\r" not in err  # transformers' own bars stay out of a log
