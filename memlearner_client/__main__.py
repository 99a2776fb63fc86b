from __future__ import annotations

from memlearner_client.cli import main

raise SystemExit(main())
