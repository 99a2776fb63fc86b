"""The main job (``bash scripts/run.sh``): ``memlearner_host.demo``, with the repository root importable."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the pack's ``nodes`` never shadows ComfyUI's
from memlearner_host.demo import main  # noqa: E402

raise SystemExit(main())
