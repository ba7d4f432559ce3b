"""train.elastic's rules and `hvdllm launch --elastic`'s command (hvdllm/elastic.py), without a
launch: the integration test (tests/integration/test_elastic.py) runs the real resize."""
import subprocess

import pytest

from hvdllm import config, elastic
from hvdllm.errors import ConfigError


def _cfg(*sets):
    return config.load(None, ["train.elastic=true", *sets])


def test_elastic_runs_plain_data_parallelism_only():
    config.validate(_cfg(), 3)
    with pytest.raises(ConfigError) as e:
        config.validate(_cfg("parallel.pp=2", "parallel.zero=1", "train.elastic_commit_every=0"), 4)
    msg = str(e.value)
    for key in ("parallel.pp = 2", "parallel.zero = 1", "train.elastic_commit_every"):
        assert key in msg, msg
    assert "train.elastic: runs plain data parallelism only" in msg


def test_launch_command_and_local_discovery_script(tmp_path):
    cmd = elastic.command(3, ["train", "c.toml"], 2, 3)
    assert cmd[:8] == ["horovodrun", "-np", "3", "--gloo", "--min-np", "2", "--max-np", "3"]
    assert cmd[cmd.index("--network-interface") + 1] == "lo"
    assert cmd[cmd.index("--reset-limit") + 1] == str(elastic.RESET_LIMIT)   # a livelocked resize ends
    assert cmd[-2:] == ["--set", "train.elastic=true"]
    script = cmd[cmd.index("--host-discovery-script") + 1]
    hosts = subprocess.run([script], capture_output=True, text=True, check=True).stdout.split()
    # one slot per name: Horovod blacklists a whole host when one of its workers dies
    assert len(hosts) == 3 and len(set(hosts)) == 3 and all(h.endswith(":1") for h in hosts)
    mine = elastic.command(2, ["train"], discovery="/opt/hosts.sh")
    assert "--network-interface" not in mine and mine[mine.index("--host-discovery-script") + 1] == "/opt/hosts.sh"
    five = subprocess.run([str(elastic.discovery_script(tmp_path / "h.sh", 5))], capture_output=True,
                          text=True, check=True).stdout.split()
    assert sum(int(h.rsplit(":", 1)[1]) for h in five) == 5
