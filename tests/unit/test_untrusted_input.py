"""Every parser of untrusted input ends in farmkeys' own errors, whatever the bytes
(issue 9, part 7). The targets are in tests/fuzz/targets.py; `make fuzz` runs the
same targets coverage-guided for longer."""

from __future__ import annotations

import contextlib

import pytest
from fuzz.targets import DEADLINE, TARGETS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from farmkeys.errors import Error

SETTINGS = settings(
    max_examples=150,
    deadline=DEADLINE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def feed(name: str, data: bytes) -> None:
    """Run one target: returning or raising farmkeys' Error is fine; anything else fails."""
    with contextlib.suppress(Error):
        TARGETS[name].run(data)


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    """A valid input of ``name`` with a few random edits: flipped bits, a cut, bytes put in
    or taken out, a stretch copied elsewhere."""
    seeds = TARGETS[name].seeds()
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "splice", "byte"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "splice" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 32))]
    return bytes(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_seeds_are_valid(name: str) -> None:
    """The mutations start from inputs the parser accepts (a fuzzer of garbage alone never
    gets past the first check)."""
    for seed in TARGETS[name].seeds():
        TARGETS[name].run(seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
@SETTINGS
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_end_in_our_errors(name: str, data: bytes) -> None:
    feed(name, data)


@pytest.mark.parametrize("name", sorted(TARGETS))
@SETTINGS
@given(data=st.data())
def test_mutations_of_valid_inputs_end_in_our_errors(name: str, data: st.DataObject) -> None:
    feed(name, data.draw(mutated(name)))


@SETTINGS
@given(text=st.text(max_size=300))
@example(text="[" * 10_000)
@example(text='{"node": "a", "generation": 1, "installed_at": 1, "certificates": []}')
@example(
    text='{"node": "a", "generation": 1, "installed_at": "2026-01-01T00:00:00+00:00",'
    ' "certificates": [], "forgotten": [1]}'
)
def test_manifest_text_ends_in_our_errors(text: str) -> None:
    feed("manifest", text.encode("utf-8", "surrogatepass"))


@SETTINGS
@given(text=st.text(max_size=300))
@example(text="[" * 10_000)
@example(text='{"farm": 1}')
def test_state_text_ends_in_our_errors(text: str) -> None:
    feed("state", text.encode("utf-8", "surrogatepass"))


TOML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=5,
)
SECTIONS = [
    "farm",
    "node",
    "database",
    "directory",
    "policy",
    "master_key",
    "lease",
    "hooks",
    "retry",
]
KEYS = [
    "name",
    "id",
    "store",
    "dsn",
    "url",
    "bind_dn",
    "password",
    "password_file",
    "container",
    "layout",
    "ca_file",
    "start_tls",
    "allow_plaintext",
    "key",
    "decryption_key",
    "certificate_duration",
    "ttl_seconds",
    "renew_seconds",
    "on_change",
    "total_seconds",
    "dkm_group",
    "store_group",
    "unit",
    "lifetime",
    "retain",
    "timeout_seconds",
]


def toml_value(value: object) -> str:
    """A tiny TOML writer for the values TOML_VALUES makes (None: an empty inline table)."""
    if value is None:
        return "{}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value).replace("inf", "inf")
    if isinstance(value, str):
        escaped = value.encode("unicode_escape").decode("ascii").replace('"', '\\"')
        return f'"{escaped}"'
    assert isinstance(value, list)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


@SETTINGS
@given(
    document=st.dictionaries(
        st.sampled_from(SECTIONS),
        st.dictionaries(st.sampled_from(KEYS), TOML_VALUES, max_size=6),
        max_size=5,
    )
)
def test_well_formed_toml_of_wrong_types_and_values_ends_in_config_errors(
    document: dict[str, dict[str, object]],
) -> None:
    text = "\n".join(
        f"[{section}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in body.items())
        for section, body in document.items()
    )
    feed("config", text.encode())
