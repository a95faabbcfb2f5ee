"""`make lint`'s type check: mypy (settings in pyproject's [tool.mypy]) on the package laid out as installed (not on the tests).

mypy cannot follow the editable install's folder mapping (`server/` is `kfresh.server`), so it checks a copy laid
out as installed (import_graph.installed_layout) and its messages are given back the source paths.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from import_graph import ROOT, installed_layout, source_path


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kfresh-typecheck-") as tmp:
        layout = installed_layout(Path(tmp))
        out = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "kfresh"],
            cwd=layout, capture_output=True, text=True,
        )  # fmt: skip
    text = re.sub(r"^(kfresh/[\w/]+\.pyi?)", lambda m: source_path(m.group(1)), out.stdout + out.stderr, flags=re.M)
    print(text, end="")
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
