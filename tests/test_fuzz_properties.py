"""Property-based fuzzing of every decoder of hostile bytes (issue 14, item 7).

The rules live in tests/fuzz/targets.py, shared with the coverage-guided atheris
targets of ``make fuzz``. Here hypothesis drives them with random bytes, JSON of
any shape, the hostile shapes the issue lists and mutations of valid messages.
``FUZZ_EXAMPLES`` raises the example count (``make fuzz`` does, when atheris is
not available).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SEEDS = targets.seeds()

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["ping", "deploy", "mqtt", "url", "digits", "pi-1", "t1", "\ud800"])
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=20,
)  # fmt: skip


def _dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def _mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid message with bytes flipped, inserted, deleted or cut off."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "nest", "number"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "nest":
            data[at:at] = b"[" * draw(st.integers(1, 200))
        else:
            data[at:at] = b"9" * draw(st.integers(1, 6000))
    return bytes(data)


def _with_field(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid message with one field replaced by any JSON value."""

    def replace(seed: bytes, key_index: int, value: object) -> bytes:
        obj = yaml.safe_load(seed)  # JSON seeds and the YAML config seed alike
        keys = sorted(obj)
        obj[keys[key_index % len(keys)]] = value
        return _dumps(obj)

    return st.builds(replace, st.sampled_from(seeds), st.integers(0, 50), _json)


_hostile = st.sampled_from(
    [
        b"[" * 2000,
        b"{" * 5000,
        b'{"id": "' + b"a" * 100_000 + b'"}',
        b'{"id": "x", "op": "ping", "n": ' + b"9" * 5000 + b"}",
        b'{"id": "x", "op": "ping", "n": 1e999}',
        b'{"id": "\\ud800", "op": "ping"}',
        b'{"id": "x", "op": "config", "changes": {"\\udfff": 1}}',
        b'"' + b"\\" * 10_000,
        b"\xef\xbb\xbf{}",
        b"\x00" * 1000,
        b"x" * (300 * 1024),
    ]
)


def _inputs(name: str) -> st.SearchStrategy[bytes]:
    seeds = SEEDS[name]
    return (
        st.binary(max_size=512)
        | _json.map(_dumps)
        | _hostile
        | _mutated(seeds)
        | _with_field(seeds)
    )


def _property(name: str) -> Callable[[], None]:
    check = targets.TARGETS[name]

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=_inputs(name))
    def run(data: bytes) -> None:
        check(data)

    return run


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_decoder_keeps_its_rules_on_any_bytes(name: str) -> None:
    _property(name)()


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_every_seed_is_accepted_by_its_parser(name: str) -> None:
    for seed in SEEDS[name]:
        targets.TARGETS[name](seed)
