"""The README's Python example runs as written (a broken example is a bug like any other)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_convert_example_runs_and_round_trips():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    model, ids = scope["model"], scope["input_ids"]
    # the example ends with revert: no router parameters are left and the model still runs
    assert not any("ssdfx" in n for n, _ in model.named_parameters())
    assert torch.isfinite(scope["loss"])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
