"""Config loading: typed, frozen, every problem reported at once with its key path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import Config, config_from_dict, config_warnings, load_config, with_overrides
from proxy.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "sidecar.yaml"


def test_shipped_config_documents_exactly_the_defaults():
    """config/sidecar.yaml loads and equals the built-in defaults, so its comments tell the truth."""
    assert load_config(SHIPPED) == Config()


def test_every_default_key_appears_in_the_shipped_file():
    """Every option of every section is written out (and so commented) in config/sidecar.yaml."""
    import yaml

    data = yaml.safe_load(SHIPPED.read_text())
    for section in dataclasses.fields(Config):
        if section.name in ("operations", "host_breaker"):
            continue
        written = set(data[section.name])
        known = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert written == known, section.name


def test_all_problems_are_reported_at_once_with_key_paths():
    """One ConfigError names every bad value and unknown key by its path."""
    bad = {
        "retry": {"max_attempts": -1, "max_atempts": 3, "base_delay": "fast"},
        "breaker": {"failure_rate": 1.5, "enabled": "yes"},
        "server": {"listen": "nowhere"},
        "upstream": {"hosts": {"api": "ftp://x"}},
        "log": {"level": "loud"},
        "bogus": 1,
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "retry.max_attempts: -1 is not a positive number" in text
    assert "unknown key: retry.max_atempts (did you mean max_attempts?)" in text
    assert "retry.base_delay: 'fast' is not a number" in text
    assert "breaker.failure_rate: 1.5 is not a ratio in (0, 1]" in text
    assert "breaker.enabled: 'yes' is not a boolean (true/false)" in text
    assert "server.listen: 'nowhere' is not HOST:PORT" in text
    assert "upstream.hosts.api: 'ftp://x' is not an http(s) URL" in text
    assert "log.level: 'loud' is not one of 'debug', 'info', 'warning', 'error'" in text
    assert "unknown key: bogus" in text
    assert len(problems) == 9


def test_cross_field_rules():
    """A deadline at or over the SDKs' 80 s timeout and base_delay > max_delay are rejected."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"retry": {"deadline": 90, "base_delay": 2, "max_delay": 1}})
    text = "\n".join(info.value.problems)
    assert "retry.deadline: 90.0 must stay under the SDKs' 80 s timeout" in text
    assert "retry.base_delay: 2.0 exceeds max_delay" in text


def test_route_to_unknown_host_is_rejected():
    """A route naming a host that is not in upstream.hosts is an error."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"upstream": {"routes": [{"method": "POST", "prefix": "/v1/files", "host": "nope"}]}})
    assert "upstream.routes[0].host: 'nope' is not in upstream.hosts" in info.value.problems


def test_operation_overrides_merge_over_the_sections():
    """Per-operation retry/breaker settings override only the keys given."""
    config = config_from_dict(
        {
            "retry": {"max_attempts": 5},
            "operations": {"POST /v1/payment_intents": {"breaker": {"open_duration": 9}}},
        }
    )
    op = config.for_operation("POST /v1/payment_intents")
    assert op.breaker.open_duration == 9.0
    assert op.breaker.failure_rate == 0.5
    assert op.retry.max_attempts == 5
    assert config.for_operation("GET /v1/customers").breaker.open_duration == 5.0


def test_operation_limits_are_read_and_checked():
    """Per-operation limits are optional numbers; bad ones are named by path."""
    config = config_from_dict({"operations": {"POST /v1/files": {"limits": {"endpoint_rate": 20, "max_in_flight": 4}}}})
    limits = config.for_operation("POST /v1/files").limits
    assert (limits.endpoint_rate, limits.endpoint_burst, limits.max_in_flight) == (20.0, None, 4)
    assert config.for_operation("GET /v1/balance").limits.endpoint_rate is None
    with pytest.raises(ConfigError) as info:
        config_from_dict({"operations": {"POST /v1/files": {"limits": {"endpoint_rate": 0, "max_inflight": 2}}}})
    text = "\n".join(info.value.problems)
    assert "operations.POST /v1/files.limits.endpoint_rate: 0 is not a positive number" in text
    assert "unknown key: operations.POST /v1/files.limits.max_inflight (did you mean max_in_flight?)" in text


def test_replay_body_cap_is_not_per_operation():
    """max_replay_body is decided at the door, before the operation is known: global only."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"operations": {"POST /v1/files": {"retry": {"max_replay_body": 10}}}})
    assert info.value.problems == ["operations.POST /v1/files.retry.max_replay_body: set it for all operations, in retry"]


def test_bad_operation_override_names_its_path():
    """Problems inside an operation override carry the full key path."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"operations": {"POST /v1/charges": {"retry": {"max_attempts": 0}, "brekaer": {}}, "nonsense": {}}})
    text = "\n".join(info.value.problems)
    assert "operations.POST /v1/charges.retry.max_attempts: 0 is not a positive number" in text
    assert "unknown key: operations.POST /v1/charges.brekaer" in text
    assert "operations.nonsense: operation must look like 'POST /v1/payment_intents'" in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    """Broken YAML is reported with its line number."""
    path = tmp_path / "bad.yaml"
    path.write_text("retry:\n  max_attempts: 3\n  base_delay: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line" in info.value.problems[0]
    assert str(path) in str(info.value)


def test_command_line_overrides_are_validated():
    """--listen and --upstream are checked like the file."""
    config = with_overrides(Config(), listen="[::1]:9000", upstream="http://127.0.0.1:12111")
    assert config.server.listen == "[::1]:9000"
    assert {o.url for o in config.origins().values()} == {"http://127.0.0.1:12111"}
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), listen="localhost", upstream="gopher://x")
    assert len(info.value.problems) == 2


def test_check_config_cli(tmp_path, capsys):
    """check-config exits 0 for a good file and 2 with every problem for a bad one."""
    assert main(["check-config", str(SHIPPED)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("retry:\n  max_attempts: zero\nlog:\n  lvl: debug\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "retry.max_attempts: 'zero' is not an integer" in err
    assert "unknown key: log.lvl (did you mean level?)" in err


def test_config_objects_are_frozen():
    """Settings cannot be changed after loading."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.retry.max_attempts = 9  # type: ignore[misc]


def test_operation_keys_must_be_stripe_operations_or_fold_names():
    """An old-style or mistyped operation key is refused with Stripe's name for it; fold names pass."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"operations": {"GET /v1/customers/{id}": {}, "POST /v1/paymnt_intents": {}}})
    assert info.value.problems == [
        "operations.GET /v1/customers/{id}: not a Stripe operation (did you mean GET /v1/customers/{customer}?)",
        "operations.POST /v1/paymnt_intents: not a Stripe operation (did you mean POST /v1/payment_intents?)",
    ]
    config = config_from_dict({"operations": {"POST /v1/customers/{customer}/*": {"retry": {"max_attempts": 1}}}})
    assert config.for_operation("POST /v1/customers/{customer}/*").retry.max_attempts == 1


def test_route_prefix_must_start_some_operation():
    """A route prefix spelled with old `{id}` names would never match: refused, with the right name."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"upstream": {"routes": [{"method": "GET", "prefix": "/v1/files/{id}/contents", "host": "files"}]}})
    assert info.value.problems == [
        "upstream.routes[0].prefix: '/v1/files/{id}/contents' starts no Stripe operation (did you mean /v1/files/{file}/contents?)"
    ]
    config = config_from_dict({"upstream": {"routes": [{"method": "*", "prefix": "/v1/quotes/{quote}/", "host": "files"}]}})
    assert config.upstream.routes[0].prefix == "/v1/quotes/{quote}/"


def test_drain_longer_than_the_grace_is_rejected():
    """server.drain_period above shutdown_grace is an error naming both keys (the grace includes the drain)."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({"server": {"drain_period": 10, "shutdown_grace": 5}})
    assert any(p.startswith("server.drain_period: 10") and "shutdown_grace" in p for p in err.value.problems)


def test_default_shutdown_timings_fit_kubernetes_and_outlast_the_retry_deadline():
    """Defaults: drain 5 s, grace 25 s >= drain + retry deadline, under the pod's 30 s; no warning."""
    config = Config()
    assert config.server.drain_period == 5.0 and config.server.shutdown_grace == 25.0
    assert config.server.shutdown_grace >= config.server.drain_period + config.retry.deadline
    assert config_warnings(config) == []


def test_a_grace_too_short_for_the_retries_or_too_long_for_kubernetes_is_warned_about():
    """A grace under drain + retry deadline, or at 30 s and over, gives a warning naming server.shutdown_grace."""
    short = config_warnings(config_from_dict({"server": {"shutdown_grace": 10}}))
    long = config_warnings(config_from_dict({"server": {"shutdown_grace": 40}}))
    assert len(short) == 1 and "drain_period + retry.deadline" in short[0]
    assert len(long) == 1 and "terminationGracePeriodSeconds" in long[0]
    assert all(w.startswith("server.shutdown_grace") for w in short + long)


def test_max_connections_must_be_positive():
    """server.max_connections 0 is refused with its key path."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({"server": {"max_connections": 0}})
    assert "server.max_connections: 0 is not a positive number" in err.value.problems


def test_retry_budget_keys_are_rejected_per_operation():
    """The retry budget is one for all operations: a per-operation budget key is an error, not ignored."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"operations": {"POST /v1/charges": {"retry": {"budget_ratio": 0.5, "budget_window": 3, "budget_min_per_second": 1}}}})
    assert info.value.problems == [
        "operations.POST /v1/charges.retry.budget_ratio: the retry budget is shared by all operations; set it in retry",
        "operations.POST /v1/charges.retry.budget_min_per_second: the retry budget is shared by all operations; set it in retry",
        "operations.POST /v1/charges.retry.budget_window: the retry budget is shared by all operations; set it in retry",
    ]
    assert config_from_dict({"retry": {"budget_ratio": 0.5}}).retry.budget_ratio == 0.5


def test_operation_breaker_cannot_require_several_operations():
    """min_failing_operations above 1 would keep an operation's breaker shut forever: rejected; fine on host_breaker."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"breaker": {"min_failing_operations": 2}, "operations": {"GET /v1/balance": {"breaker": {"min_failing_operations": 3}}}})
    assert info.value.problems == [
        "breaker.min_failing_operations: 2 would keep an operation's breaker from ever opening; it applies to host_breaker only",
        "operations.GET /v1/balance.breaker.min_failing_operations: 3 would keep an operation's breaker from ever opening; it applies to host_breaker only",
    ]
    assert config_from_dict({"host_breaker": {"min_failing_operations": 5}}).host_breaker.min_failing_operations == 5


def test_ratelimit_ceilings_are_off_by_default_and_checked() -> None:
    """No static cap by default; a burst without a rate, a factor of 1 and removed keys are errors."""
    config = config_from_dict({})
    assert (config.ratelimit.global_rate, config.ratelimit.endpoint_rate) == (None, None)
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {
                "ratelimit": {"global_burst": 5, "decrease_factor": 1, "recover_share_per_second": 0.2},
                "operations": {"POST /v1/files": {"limits": {"endpoint_burst": 0.5}}},
            }
        )
    text = "\n".join(err.value.problems)
    assert "ratelimit.global_burst: a burst needs a ceiling rate (ratelimit.global_rate)" in text
    assert "ratelimit.decrease_factor: 1.0 must be below 1" in text
    assert "unknown key: ratelimit.recover_share_per_second" in text
    assert "operations.POST /v1/files.limits.endpoint_burst: 0.5 is below 1 request" in text


def test_outbox_settings_and_fallback_are_checked_with_key_paths():
    """fallback and the outbox section: every problem named by its key path, secrets never echoed."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({
            "operations": {
                "GET /v1/customers": {"fallback": "queue"},
                "POST /oauth/token": {"fallback": "queue"},
                "POST /v1/refunds": {"fallback": "later"},
            },
            "outbox": {"store": "mysql://u:hunter2@db/x", "lease": 5, "safety_margin": 90000,
                       "backoff_base": 90, "callback_url": "ftp://x", "batchh": 3},
        })
    problems = info.value.problems
    assert "operations.GET /v1/customers.fallback: queue is for POST operations only (a write made safe to send later by its Idempotency-Key)" in problems
    assert any(p.startswith("operations.POST /oauth/token.fallback: connect.stripe.com takes no Idempotency-Key") for p in problems)
    assert "operations.POST /v1/refunds.fallback: 'later' is not one of 'fail', 'queue'" in problems
    assert "outbox.store: not a sqlite:///PATH or redis://HOST:PORT/DB URL" in problems
    assert any(p.startswith("outbox.lease: 5.0 must outlast a delivery's retries") for p in problems)
    assert "outbox.safety_margin: 90000.0 leaves nothing of the idempotency window" in problems
    assert "outbox.backoff_base: 90.0 exceeds backoff_max" in problems
    assert "outbox.callback_url: not an http(s) URL" in problems
    assert "unknown key: outbox.batchh (did you mean batch?)" in problems
    assert not any("hunter2" in p for p in problems)


def test_queue_fallback_and_the_store_from_the_environment():
    """fallback: queue is read per operation; STRIPE_SIDECAR_OUTBOX_STORE overrides, checked."""
    config = config_from_dict({"operations": {"POST /v1/customers": {"fallback": "queue"}}})
    assert config.for_operation("POST /v1/customers").fallback == "queue"
    assert config.for_operation("POST /v1/refunds").fallback == "fail"
    assert config.outbox.lease == 60.0  # the lease check passes with the defaults
    moved = with_overrides(config, listen=None, upstream=None, outbox_store="redis://r:6379/0")
    assert moved.outbox.store == "redis://r:6379/0"
    with pytest.raises(ConfigError) as info:
        with_overrides(config, listen=None, upstream=None, outbox_store="sqlite://host/x")
    assert info.value.problems == [
        "STRIPE_SIDECAR_OUTBOX_STORE: a SQLite store is sqlite:///relative/path or sqlite:////absolute/path"
    ]


def test_ratelimit_shared_must_be_a_redis_url_and_is_never_echoed() -> None:
    """ratelimit.shared: redis://, rediss:// or unix:// with a host or path; problems name the key path, not the URL (it may hold a password)."""
    for url in ("redis://:pw@redis.internal:6379/0", "rediss://r:6380", "unix:///run/redis.sock"):
        assert config_from_dict({"ratelimit": {"shared": url}}).ratelimit.shared == url
    cases = {
        "http://:s3cret@r:6379": "ratelimit.shared: is not a redis://, rediss:// or unix:// URL",
        "redis://:s3cret@:6379/0": "ratelimit.shared: names no host (redis://HOST:6379/0)",
        "redis://r:port/0": "ratelimit.shared: is not a URL (Port could not be cast to integer value as 'port')",
        "unix://": "ratelimit.shared: names no socket path (unix:///path/redis.sock)",
    }
    for url, problem in cases.items():
        with pytest.raises(ConfigError) as err:
            config_from_dict({"ratelimit": {"shared": url}})
        assert err.value.problems == [problem]
        assert "s3cret" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"ratelimit": {"shared": "redis://r", "enabled": False}})
    assert err.value.problems == ["ratelimit.shared: set, but ratelimit.enabled is false"]
    with pytest.raises(ConfigError) as err:
        config_from_dict({"ratelimit": {"shared_interval": 0}})
    assert err.value.problems == ["ratelimit.shared_interval: 0 is not a positive number"]


def test_ratelimit_shared_from_the_environment_is_validated() -> None:
    """STRIPE_SIDECAR_RATELIMIT_SHARED (through with_overrides) sets ratelimit.shared, checked like the file's."""
    config = with_overrides(Config(), listen=None, upstream=None, ratelimit_shared="redis://r:6379/0")
    assert config.ratelimit.shared == "redis://r:6379/0"
    assert with_overrides(Config(), listen=None, upstream=None, ratelimit_shared="").ratelimit.shared is None
    with pytest.raises(ConfigError) as err:
        with_overrides(Config(), listen=None, upstream=None, ratelimit_shared="r:6379")
    assert err.value.problems == ["ratelimit.shared: is not a redis://, rediss:// or unix:// URL"]
