"""The diagnosis: and alerts: sections: validated with key paths, defaults as shipped."""

from __future__ import annotations

import pytest

from proxy.alerts import Webhook
from proxy.config import Config, config_from_dict
from proxy.errors import ConfigError


def test_every_problem_is_named_by_its_key_path() -> None:
    """Bad thresholds, unknown keys, bad webhook URLs and formats are all reported at once."""
    bad = {
        "diagnosis": {
            "window": 0,
            "clear_ratio": 1.5,
            "stripe_outage": {"ratio": 2, "min_operations": 0},
            "latency_degraded": {"p99": "slow"},
            "rate_limted": {},
        },
        "alerts": {
            "webhooks": ["ftp://x", {"url": "https://h/p", "format": "xml"}, {"uri": "x"}],
            "min_severity": "loud",
        },
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad)
    text = "\n".join(info.value.problems)
    assert "diagnosis.window: 0 is not a positive number" in text
    assert "diagnosis.clear_ratio: 1.5 is not a ratio in (0, 1]" in text
    assert "diagnosis.stripe_outage.ratio: 2 is not a ratio in (0, 1]" in text
    assert "diagnosis.stripe_outage.min_operations: 0 is not a positive number" in text
    assert "diagnosis.latency_degraded.p99: 'slow' is not a number" in text
    assert "unknown key: diagnosis.rate_limted (did you mean rate_limited?)" in text
    assert "alerts.webhooks[0].url: not an http(s) URL" in text
    assert "alerts.webhooks[1].format: 'xml' is not one of 'slack', 'json'" in text
    assert "unknown key: alerts.webhooks[2].uri (did you mean url?)" in text
    assert "alerts.min_severity: 'loud' is not one of 'critical', 'warning', 'info'" in text
    assert "ftp://x" not in text  # a webhook URL may hold a token: never echoed


def test_webhooks_accept_bare_urls_and_mappings() -> None:
    """A bare URL gets the json format; a mapping may choose slack."""
    config = config_from_dict(
        {"alerts": {"webhooks": ["https://a.example/x", {"url": "https://b.example/y", "format": "slack"}]}}
    )
    assert config.alerts.webhooks == (
        Webhook("https://a.example/x", "json"),
        Webhook("https://b.example/y", "slack"),
    )


def test_defaults_switch_diagnosis_on_and_alerts_off() -> None:
    """Out of the box: diagnosis evaluates once a second; no webhook is called."""
    config = Config()
    assert config.diagnosis.enabled and config.diagnosis.interval == 1.0
    assert config.alerts.webhooks == ()
