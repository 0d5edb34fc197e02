"""selftune.storage must stay importable without torch (DESIGN.md: storage never imports torch)."""

from __future__ import annotations

import subprocess
import sys


def test_storage_never_imports_torch() -> None:
    code = (
        "import sys, selftune.storage, selftune.storage.repositories, selftune.storage.models, selftune.storage.db\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'avalanche') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", f"selftune.storage imported {done.stdout.strip()}"
