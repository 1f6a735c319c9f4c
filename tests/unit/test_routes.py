"""Operation names from Stripe's table, the fold of unknown paths, the cap, and host routing."""

from __future__ import annotations

import random
import re
import string

import pytest

from proxy.routes import DEFAULT_ROUTES, OperationTable, Router, operation_table


def router(max_operations: int = 200) -> Router:
    return Router(DEFAULT_ROUTES, max_operations=max_operations)


def test_shipped_table_says_where_it_came_from_and_holds_every_sdk_operation():
    """The packaged table loads with its 566 SDK operations plus the three documented extras."""
    table = operation_table()
    assert len(table.operations) == 569
    assert len(set(table.operations)) == 569
    assert "GET /v1/customers/{customer}" in table.operations
    assert "POST /v2/billing/meter_event_stream" in table.operations
    assert "GET /v1/files/{file}/contents" in table.operations


@pytest.mark.parametrize(
    "customer_id",
    ["cus_abcdef", "cus_NffrFeUfNV2Hib", "my-customer.1", "a~b:c@d", "%41bc", "search2", "x"],
)
def test_an_id_is_recognised_by_its_place_whatever_its_characters(customer_id):
    """Any non-empty segment where Stripe has a placeholder is that placeholder."""
    assert router().resolve("GET", f"/v1/customers/{customer_id}") == ("GET /v1/customers/{customer}", "api")


def test_every_operation_in_the_table_resolves_to_itself():
    """Each template, with its placeholders filled by IDs, comes back as exactly that operation."""
    r = router()
    rng = random.Random(7)
    for op in operation_table().operations:
        method, _, template = op.partition(" ")
        path = re.sub(r"\{[^}]+\}", lambda _: "id_" + "".join(rng.choices(string.ascii_letters, k=8)), template)
        assert r.resolve(method, path)[0] == op, path


def test_literal_segments_win_over_placeholders_and_backtrack_when_needed():
    """`search` is the search call on GET; on POST only the {customer} template fits."""
    r = router()
    assert r.resolve("GET", "/v1/customers/search")[0] == "GET /v1/customers/search"
    assert r.resolve("POST", "/v1/customers/search")[0] == "POST /v1/customers/{customer}"
    assert r.resolve("GET", "/v1/application_fees/fee_1/refunds/fr_1")[0] == "GET /v1/application_fees/{fee}/refunds/{id}"
    assert r.resolve("GET", "/v1/application_fees/fee_1/refunds")[0] == "GET /v1/application_fees/{id}/refunds"


@pytest.mark.parametrize(
    ("method", "path", "operation", "host"),
    [
        ("POST", "/v1/files", "POST /v1/files", "files"),
        ("GET", "/v1/files/file_abc/contents", "GET /v1/files/{file}/contents", "files"),
        ("GET", "/v1/files/file_abc", "GET /v1/files/{file}", "api"),
        ("GET", "/v1/quotes/qt_abc/pdf", "GET /v1/quotes/{quote}/pdf", "files"),
        ("GET", "/v1/quotes/qt_abc", "GET /v1/quotes/{quote}", "api"),
        ("POST", "/oauth/token", "POST /oauth/token", "connect"),
        ("POST", "/oauth/brand_new", "POST /oauth/*", "connect"),
        ("POST", "/v2/billing/meter_event_stream", "POST /v2/billing/meter_event_stream", "meter_events"),
        ("POST", "/v2/billing/meter_events", "POST /v2/billing/meter_events", "api"),
    ],
)
def test_default_host_routes_use_stripes_template_names(method, path, operation, host):
    """Uploads, file contents and quote PDFs go to files, OAuth to connect, the stream to meter_events."""
    assert router().resolve(method, path) == (operation, host)


@pytest.mark.parametrize(
    ("method", "path", "folded"),
    [
        ("GET", "/v1/brand_new_resource/thing_1", "GET /v1/*"),
        ("POST", "/v1/customers/cus_1/brand_new_action", "POST /v1/customers/{customer}/*"),
        ("GET", "/v1/customers/", "GET /v1/customers/*"),
        ("PUT", "/v1/customers/cus_1", "PUT /v1/customers/{customer}"),
        ("GET", "/v1/products/prod_1/nope", "GET /v1/products/{id}/*"),
        ("GET", "/v2/core/nothing/here/at/all", "GET /v2/core/*"),
    ],
)
def test_unknown_paths_fold_to_their_known_segments(method, path, folded):
    """Known segments are kept; the first unknown one ends the name as `*`; the rest is dropped."""
    assert router().resolve(method, path)[0] == folded
    assert operation_table().accepts(folded)


def _random_path(rng: random.Random, literals: list[str]) -> str:
    segments = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.5:
            segments.append(rng.choice(literals))
        else:
            segments.append("".join(rng.choices(string.ascii_letters + string.digits + "_-.~", k=rng.randint(0, 12))))
    return "/" + rng.choice(["v1", "v2", "oauth"]) + "/" + "/".join(segments)


def test_fifty_thousand_distinct_paths_make_a_bounded_number_of_operations():
    """Random paths (IDs of any shape, known words in any order) never exceed table + cap names."""
    rng = random.Random(1)
    literals = sorted({s for op in operation_table().operations for s in op.split(" ")[1].split("/") if s and "{" not in s})
    methods = ["GET", "POST", "DELETE", "PUT", "PATCH"]
    r = router(max_operations=200)
    ops = {r.resolve(rng.choice(methods), _random_path(rng, literals))[0] for _ in range(50_000)}
    folded = ops - set(operation_table().operations)
    assert len(folded - {f"{m} other" for m in methods}) <= 200
    assert len(ops) <= 569 + 200 + len(methods)
    assert any(op.endswith(" other") for op in ops)  # the cap was reached, and held


def test_operation_cap_holds_past_max_operations():
    """Past max_operations folded names, further unknown paths count as `METHOD other`."""
    r = router(max_operations=3)
    names = [r.resolve("GET", f"/v1/customers/cus_1/{word}")[0] for word in ("a", "b")]
    names += [r.resolve("PUT", f"/v1/{word}")[0] for word in ("charges", "refunds", "payouts")]
    assert names == [
        "GET /v1/customers/{customer}/*",
        "GET /v1/customers/{customer}/*",
        "PUT /v1/charges",
        "PUT /v1/refunds",
        "PUT other",
    ]
    assert r.resolve("GET", "/v1/customers/cus_2")[0] == "GET /v1/customers/{customer}"  # known: never capped
    assert r.resolve("GET", "/v1/customers/cus_2/c")[0] == "GET /v1/customers/{customer}/*"  # folded before the cap


def test_repeated_paths_are_answered_from_the_bounded_recent_cache():
    """The recent-path cache answers repeats identically and never grows past its bound."""
    r = router()
    first = r.resolve("GET", "/v1/customers/cus_same")
    assert r.resolve("GET", "/v1/customers/cus_same") is first
    for i in range(10_000):
        r.resolve("GET", f"/v1/customers/cus_{i}")
    assert len(r._recent) <= 4096


def test_accepts_table_names_and_fold_names_only():
    """Config keys: Stripe's names and names a fold can produce pass; old `{id}` names do not."""
    table = operation_table()
    assert table.accepts("GET /v1/customers/{customer}")
    assert table.accepts("POST /v1/customers/{customer}/*")
    assert table.accepts("PUT /v1/customers/{customer}")
    assert not table.accepts("GET /v1/customers/{id}")  # the table names it {customer}
    assert not table.accepts("GET /v1/customers/*/x")
    assert not table.accepts("GET /v1/custmers")
    assert table.suggest("GET /v1/customers/{id}") == "GET /v1/customers/{customer}"
    assert table.suggest("GET /v1/custmers") == "GET /v1/customers"


def test_placeholders_that_stripe_names_differently_fold_as_id():
    """Where calls disagree on a placeholder's name, a folded name says {id}."""
    table = OperationTable(["GET /v1/things/{thing}", "GET /v1/things/{id}/parts", "# a comment"])
    assert table.operations == ("GET /v1/things/{thing}", "GET /v1/things/{id}/parts")
    assert table.fold("GET", ["v1", "things", "t_1", "x"]) == "GET /v1/things/{id}/*"
    assert table.match("GET", ["v1", "things", "t_1"]) == "GET /v1/things/{thing}"
