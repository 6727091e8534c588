import os
import subprocess
import sys

import pytest

CODE = "import os, data2vec, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "PASSIVE"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        ({"GOMP_SPINCOUNT": "1000"}, "None"),
    ],
)
def test_omp_wait_policy_default_respects_the_user(env, expected):
    assert _policy(env) == expected


def test_threads_never_exceed_available_cores():
    from data2vec.engine.runtime import available_cores, configure_threads

    assert configure_threads(10_000) == available_cores()
    assert configure_threads(1) == 1
    configure_threads(None)
