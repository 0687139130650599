"""A real one-node Slurm cluster for the `slurm` tests, started once per session and stopped by pid afterwards.

`scripts/slurm/start_cluster.sh` installs Debian's slurmctld/slurmd/munge when missing (apt-get, about 15 s) and
starts the daemons; where it cannot (not root, no apt-get, no package mirror) the tests that use `slurm_cluster`
skip with the script's reason. A cluster that was already running before the session is left running.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from slurm_helpers import SlurmCluster, SlurmUnavailable, start_cluster, stop_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster (installed and started if needed; stopped by pid if started here)."""
    try:
        cluster = start_cluster()
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm cluster: {e}")
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        if cluster.started_here:
            stop_cluster()
