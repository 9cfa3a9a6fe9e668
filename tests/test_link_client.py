"""MqttLink pieces that need no broker: backoff, password sources, certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.link.client import Backoff, LinkError, MqttLink, resolve_password, tls_context
from tests.link_support import make_config


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    low = Backoff(1.0, 8.0, rand=lambda: 0.0)
    assert [low.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    high = Backoff(1.0, 8.0, rand=lambda: 1.0)
    assert [high.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    high.reset()
    assert high.next_delay() == 1.0


def test_password_from_file_env_or_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert resolve_password(make_config(tmp_path, mqtt={"password_file": str(secret)}).mqtt) == (
        "s3cret"
    )
    monkeypatch.setenv("EDGE_PW", "from-env")
    assert resolve_password(make_config(tmp_path, mqtt={"password_env": "EDGE_PW"}).mqtt) == (
        "from-env"
    )
    assert resolve_password(make_config(tmp_path, mqtt={"password": "inline"}).mqtt) == "inline"
    monkeypatch.delenv("EDGE_PW")
    with pytest.raises(LinkError, match="EDGE_PW is not set"):
        resolve_password(make_config(tmp_path, mqtt={"password_env": "EDGE_PW"}).mqtt)
    with pytest.raises(LinkError, match="cannot read"):
        resolve_password(make_config(tmp_path, mqtt={"password_file": str(tmp_path / "no")}).mqtt)


def test_unreadable_certificates_are_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    config = make_config(tmp_path, mqtt={"tls": {"enabled": True, "ca_file": str(bad)}})
    with pytest.raises(LinkError, match=r"mqtt.tls: cannot load certificates"):
        tls_context(config.mqtt)
    with pytest.raises(LinkError):
        MqttLink(config).start()


def test_state_falls_back_when_the_provider_fails(tmp_path: Path) -> None:
    link = MqttLink(make_config(tmp_path))

    def broken() -> object:
        raise RuntimeError("nope")

    link.set_state_provider(broken)  # type: ignore[arg-type]
    state = link.state()
    assert state.online and state.device == "pi-1" and state.groups == ["kitchen"]
    assert not link.state(online=False).online
