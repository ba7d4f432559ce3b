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
    assert "--blacklist-cooldown-range" not in mine   # Horovod's default: a failed host stays out
    back = elastic.command(3, ["train"], 2, 3, cooldown=(10, 60))
    assert back[back.index("--blacklist-cooldown-range") + 1:][:2] == ["10", "60"]
    five = subprocess.run([str(elastic.discovery_script(tmp_path / "h.sh", 5))], capture_output=True,
                          text=True, check=True).stdout.split()
    assert sum(int(h.rsplit(":", 1)[1]) for h in five) == 5


def test_the_global_batch_is_split_over_each_world_size():
    """train.elastic_global_batch: each worker's train.batch_size is global / size, at start
    (config.resolve) and after each resize (rebuild resolves again); a size that does not divide
    it is one message naming the key."""
    cfg = _cfg("train.elastic_global_batch=12", "train.batch_size=5")
    assert config.resolve(cfg, 3, 256).train.batch_size == 4
    two = config.resolve(config.resolve(cfg, 3, 256), 2, 256)   # a resolved config, resized
    assert two.train.batch_size == 6 and two.train.elastic_global_batch == 12
    assert config.resolve(_cfg("train.batch_size=5"), 3, 256).train.batch_size == 5   # 0: per worker
    with pytest.raises(ConfigError, match="train.elastic_global_batch: 12 sequences cannot be split evenly over 5"):
        config.validate(cfg, 5)
    with pytest.raises(ConfigError, match="over 5 workers"):
        config.resolve(cfg, 5, 256)
    with pytest.raises(ConfigError, match="train.elastic_join_timeout"):
        config.validate(_cfg("train.elastic_join_timeout=0"), 2)
