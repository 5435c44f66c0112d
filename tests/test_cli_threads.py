"""The CLI's OpenMP wait policy: spin only on otherwise idle cores, never override the user."""

from __future__ import annotations

import os
import subprocess
import sys

from minimoe.cli.main import _command_in, wait_policy

PROBE = "import os, minimoe.cli.main; print(os.environ['OMP_WAIT_POLICY'])"


def _policy(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True
    ).stdout.strip()


def test_wait_policy_rule():
    assert wait_policy(0.0) == "ACTIVE"
    assert wait_policy(1.0) == "PASSIVE"
    # a server on idle cores gets the runtime's default (spin a while, then sleep), not ACTIVE's
    # endless spinning between requests; on busy cores PASSIVE like every command
    assert wait_policy(0.0, "serve") is None
    assert wait_policy(1.0, "serve") == "PASSIVE"
    assert wait_policy(0.0, "train") == "ACTIVE"


def test_the_command_is_read_from_argv():
    assert _command_in(["--debug", "serve", "runs/x", "--port", "8000"]) == "serve"
    assert _command_in([]) is None


def test_user_value_wins_and_a_busy_machine_gets_passive():
    assert _policy("ACTIVE") == "ACTIVE"
    assert _policy("PASSIVE") == "PASSIVE"
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert _policy(None) == "PASSIVE"  # another process keeps a core busy
    finally:
        hog.kill()
        hog.wait()
