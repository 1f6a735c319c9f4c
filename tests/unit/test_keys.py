"""The held key set (proxy.keys): parsing, masking, failover and checks, without any I/O."""

from __future__ import annotations

import pytest

from proxy.keys import KeySet, KeyState, keys_from_env, mask, parse_keys

A = "sk_test_primaryKey00000000000aaaa"
B = "sk_test_secondKey000000000000bbbb"
C = "sk_test_thirdKey0000000000000cccc"


def checked(keys: list[str], accounts: dict[str, str | None]) -> KeySet:
    """A key set whose keys were checked with the given accounts (None: a 401)."""
    ks = KeySet(keys)
    for k in ks.keys:
        if k.secret in accounts:
            ks.checked(k, accounts[k.secret])
    ks.settle()
    return ks


def test_mask_shows_the_last_four_characters_only() -> None:
    """A key is shown as its last 4 characters; a short string shows nothing."""
    assert mask(A) == "…aaaa"
    assert mask("short") == "…"


def test_parse_keys_skips_blanks_and_comments_and_masks_problems() -> None:
    """Blank lines and comments are skipped; a bad or repeated entry is named, masked."""
    keys, problems = parse_keys(f"# keys\n{A}\n\n  {B}  \nnot a key!\n{A}\n")
    assert keys == [A, B]
    assert problems == [
        "entry 5 (…key!) is not a Stripe secret key",
        f"entry 6 ({mask(A)}) repeats an earlier key",
    ]
    assert all(A not in p for p in problems)


def test_a_key_with_a_line_break_is_refused() -> None:
    """Nothing that could split a header line is accepted as a key."""
    keys, problems = parse_keys(f"{A}\r\nX-Injected: 1", separator=",")
    assert keys == [] and len(problems) == 1


def test_environment_keys_and_token() -> None:
    """STRIPE_SIDECAR_SECRET_KEYS is comma-separated, primary first; a short token is refused."""
    keys, problems, token = keys_from_env(
        {"STRIPE_SIDECAR_SECRET_KEYS": f"{A}, {B}", "STRIPE_SIDECAR_CLIENT_TOKEN": "t" * 20}
    )
    assert (keys, problems, token) == ([A, B], [], "t" * 20)
    _, problems, _ = keys_from_env({"STRIPE_SIDECAR_CLIENT_TOKEN": "short"})
    assert problems and "STRIPE_SIDECAR_CLIENT_TOKEN" in problems[0]


def test_primary_is_used_until_checked_and_each_line_is_ready() -> None:
    """Before any check the primary is active; its Authorization line is built once."""
    ks = KeySet([A, B])
    assert ks.active.secret == A
    assert ks.active.line == f"Authorization: Bearer {A}\r\n".encode()
    assert repr(ks.active) == f"HeldKey({mask(A)})"


def test_failover_moves_to_the_next_checked_key() -> None:
    """A 401 on the active key moves to the next good key; the old one is rejected."""
    ks = checked([A, B, C], {A: "acct_1", B: "acct_1", C: "acct_1"})
    a, b, _ = ks.keys
    assert ks.next_after(a) is b
    assert ks.fail_over(a) is b
    assert ks.active is b and ks.state(a) is KeyState.REJECTED


def test_concurrent_401s_follow_the_key_already_moved_to() -> None:
    """Requests that met 401 with the old key go on with the new active key, not a third."""
    ks = checked([A, B, C], {A: "acct_1", B: "acct_1", C: "acct_1"})
    a, b, _ = ks.keys
    ks.fail_over(a)
    assert ks.fail_over(a) is b
    assert ks.active is b


def test_no_failover_to_unchecked_rejected_or_other_account_keys() -> None:
    """Only keys that passed their check on the reference account are failed over to."""
    ks = checked([A, B, C], {A: "acct_1", B: "acct_2", C: None})
    a = ks.keys[0]
    assert ks.states() == {mask(A): "ok", mask(B): "other_account", mask(C): "rejected"}
    assert ks.next_after(a) is None
    assert ks.fail_over(a) is None
    assert ks.active is a  # nothing better: the app sees Stripe's 401
    assert ks.next_after(KeySet([A, B]).keys[0]) is None  # unchecked


def test_settle_skips_a_primary_rejected_at_its_check_and_restores_it_later() -> None:
    """A primary that fails its check is not used; once it passes again it is active again."""
    ks = checked([A, B], {A: None, B: "acct_1"})
    a, b = ks.keys
    assert ks.active is b and ks.account == "acct_1"
    ks.checked(a, "acct_1")
    settled = ks.settle()
    assert (settled.before, settled.after) == (b, a)


def test_replace_keeps_what_is_known_and_finds_the_account_anew() -> None:
    """A rewritten file keeps unchanged keys' checks; a removed active key gives way."""
    ks = checked([A, B], {A: "acct_1", B: "acct_1"})
    ks.fail_over(ks.keys[0])
    ks.replace([B, C])
    assert [k.secret for k in ks.keys] == [B, C]
    assert ks.active.secret == B and ks.account is None
    assert ks.settle().account == "acct_1"
    with pytest.raises(ValueError):
        ks.replace([])
