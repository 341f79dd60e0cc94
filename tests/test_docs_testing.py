"""docs/testing.md's code runs as written: a custom integrator and a solver over it pass every check, a denoiser
left in training mode is named, round trips on the mixture and a random x0 network hold, the property test passes."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "testing.md"


def test_docs_testing_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "docs_testing"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    # and what their comments promise
    assert namespace["reports"][0].ok and len(namespace["reports"]) == 2
    assert "within the rounding model" in capsys.readouterr().out
