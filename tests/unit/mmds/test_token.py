import base64

import pytest
from hypothesis import given, strategies as st

from asyncvmm.mmds.token import (MAX_TOKEN_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS, TOKEN_LENGTH,
                                 TokenAuthority, TokenTtlError)
from tests.unit.mmds.guest import FakeClock


def test_token_is_valid_until_its_ttl_elapses():
    clock = FakeClock(50.0)
    auth = TokenAuthority(clock)
    token = auth.generate(60)
    assert len(token) == TOKEN_LENGTH
    assert auth.is_valid(token)
    clock.advance(59.999)
    assert auth.is_valid(token)
    clock.advance(0.001)
    assert not auth.is_valid(token)


@pytest.mark.parametrize("ttl", [MIN_TOKEN_TTL_SECONDS, 3600, MAX_TOKEN_TTL_SECONDS])
def test_ttl_bounds_are_inclusive(ttl):
    clock = FakeClock()
    auth = TokenAuthority(clock)
    token = auth.generate(ttl)
    clock.advance(ttl - 0.5)
    assert auth.is_valid(token)
    clock.advance(0.5)
    assert not auth.is_valid(token)


@pytest.mark.parametrize("ttl", [0, -1, MAX_TOKEN_TTL_SECONDS + 1, 2**40])
def test_ttl_out_of_range_is_refused_with_firecrackers_message(ttl):
    with pytest.raises(TokenTtlError) as exc:
        TokenAuthority(FakeClock()).generate(ttl)
    assert str(exc.value) == (f"Invalid time to live value provided for token: {ttl}. "
                              "Please provide a value between 1 and 21600.")


def test_tokens_are_distinct_and_bound_to_their_authority():
    clock = FakeClock()
    a, b = TokenAuthority(clock), TokenAuthority(clock)
    ta1, ta2 = a.generate(60), a.generate(60)
    assert ta1 != ta2
    assert a.is_valid(ta1) and a.is_valid(ta2)
    # Another process (another key), e.g. after a snapshot restore, rejects them.
    assert not b.is_valid(ta1)


def test_extending_the_expiry_breaks_the_tag():
    clock = FakeClock()
    auth = TokenAuthority(clock)
    raw = bytearray(base64.urlsafe_b64decode(auth.generate(1) + "=="))
    raw[1:9] = (2**62).to_bytes(8, "big")  # expiry field: far future
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert not auth.is_valid(forged)


def test_every_single_bit_flip_is_rejected():
    auth = TokenAuthority(FakeClock())
    raw = base64.urlsafe_b64decode(auth.generate(60) + "==")
    for i in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[i // 8] ^= 1 << (i % 8)
        assert not auth.is_valid(base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode())


def test_wrong_alphabet_is_rejected():
    auth = TokenAuthority(FakeClock())
    token = auth.generate(60)
    std = token.replace("-", "+").replace("_", "/")
    assert std == token or not auth.is_valid(std)
    assert not auth.is_valid(token[:-1] + "=")


@given(st.text(max_size=120))
def test_arbitrary_strings_are_never_valid_and_never_raise(text):
    assert not TokenAuthority(FakeClock()).is_valid(text)


def test_short_key_is_refused():
    with pytest.raises(ValueError):
        TokenAuthority(FakeClock(), key=b"short")
