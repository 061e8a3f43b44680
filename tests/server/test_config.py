"""Configuration loading: the seed's keys, validation messages that name the key, env overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import ConfigError, load_settings, parse_settings
from tests.conftest import REPO

SEED_CONFIG = """
decision:
  algorithm:
    type: gmtrouter
    gmtrouter:
      num_layers: 2
      hidden_dim: 64
      num_heads: 4
      learn_preferences: true
      model_path: null
models:
  - name: gpt-4
    backend: openai
  - name: gpt-3.5-turbo
    backend: openai
  - name: claude-3-opus
    backend: anthropic
"""


def test_seed_configuration_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SEED_CONFIG)
    s = load_settings(path, environ={})
    assert s.gmtrouter.num_layers == 2 and s.gmtrouter.hidden_dim == 64
    assert [m.name for m in s.models] == ["gpt-4", "gpt-3.5-turbo", "claude-3-opus"]
    assert s.store.uri == "sqlite:///data/gmtrouter.db"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("num_layers", 7, "decision.algorithm.gmtrouter.num_layers"),
        ("num_layers", 0, "allowed: 1-5"),
        ("num_heads", 0, "decision.algorithm.gmtrouter.num_heads"),
        ("hidden_dim", 66, "hidden_dim (got 66) must be divisible by num_heads (got 4)"),
    ],
)
def test_invalid_values_name_the_key_and_range(key: str, value: int, expected: str) -> None:
    data = yaml.safe_load(SEED_CONFIG)
    data["decision"]["algorithm"]["gmtrouter"][key] = value
    with pytest.raises(ConfigError) as err:
        parse_settings(data, "c.yaml")
    assert expected in str(err.value)


def test_unknown_key_and_bad_type_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings({"sampler": {"hops": "many", "fanout": [1]}})
    msg = str(err.value)
    assert "sampler.hops" in msg and "sampler.fanout: unknown key" in msg


def test_environment_overrides_neo4j_secret(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store:\n  uri: bolt://db:7687\n  neo4j:\n    password: from-file\n")
    s = load_settings(path, environ={"NEO4J_PASSWORD": "from-env", "NEO4J_USER": "svc"})
    assert s.store.neo4j.password.get_secret_value() == "from-env"
    assert s.store.neo4j.user == "svc"
    assert "from-env" not in repr(s) and "from-env" not in s.model_dump_json()


def test_cli_overrides(tmp_path: Path) -> None:
    s = load_settings(None, store_uri="sqlite:///x.db", port=1234, environ={})
    assert s.store.uri == "sqlite:///x.db" and s.server.port == 1234


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("decision: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(scalar, environ={})


def test_serve_with_invalid_config_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("decision:\n  algorithm:\n    gmtrouter:\n      num_layers: 9\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "decision.algorithm.gmtrouter.num_layers" in proc.stderr
    assert "allowed: 1-5" in proc.stderr


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["decision", "models", "server", "store", "sampler", "embedding", "x"]),
        json_values,
        max_size=4,
    )
)
def test_config_loader_never_crashes(data: dict[str, object]) -> None:
    """Any mapping either validates or raises ConfigError — nothing else."""
    try:
        parse_settings(data)
    except ConfigError as exc:
        assert str(exc).startswith("invalid configuration")


def test_readme_configuration_reference_is_valid() -> None:
    """The YAML block of the README's configuration reference loads as it is."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Configuration", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    s = parse_settings(yaml.safe_load(block), "README.md")
    assert s.gmtrouter.num_layers == 2 and s.sampler.hops == 2


def test_server_encoder_threads_default_to_auto_threads_and_config_wins(
    tmp_path: Path,
) -> None:
    from graphstore.sqlite_store import SQLiteGraphStore
    from model.text_encoder import auto_threads
    from server.app import RouterServer

    store = SQLiteGraphStore(tmp_path / "g.db", embedding_dim=384)
    default = RouterServer(parse_settings({}), store=store, environ={})
    assert default.encoder.threads == auto_threads()
    pinned = RouterServer(parse_settings({"embedding": {"threads": 3}}), store=store, environ={})
    assert pinned.encoder.threads == 3
    with pytest.raises(ConfigError, match="threads"):
        parse_settings({"embedding": {"threads": -1}})
