"""Issue 31: importing para_policy leaves the environment (OMP_WAIT_POLICY included) as it found it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, os
before = dict(os.environ)
import para_policy  # noqa: F401
after = dict(os.environ)
print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}))
"""


def test_importing_para_policy_leaves_the_environment_unchanged():
    """Neither OMP_WAIT_POLICY nor anything else is set for the importing program and its children."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {}
