"""What every config section shares: unknown keys are errors, assignments are validated; the data home."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

DEFAULT_HOME = Path(os.environ.get("KFRESH_HOME", ".kfresh"))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
