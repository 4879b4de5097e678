"""Property-based fuzz of the request schema: no body, however odd, gets a 5xx."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.conftest import in_process_app

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.sampled_from(
                [
                    "instances",
                    "ids",
                    "labels",
                    "id",
                    "label",
                    "overwrite",
                    "inputs",
                    "dataframe_split",
                    "dataframe_records",
                    "columns",
                    "data",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=40,
)
row = st.lists(
    st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-5, 20),
    min_size=60,
    max_size=66,
)
near_valid = st.fixed_dictionaries(
    {"instances": st.lists(row, min_size=0, max_size=3)},
    optional={"ids": st.lists(st.text(max_size=10), max_size=3)},
)
fuzz = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client(base_project):
    with in_process_app(base_project, "fuzz.db") as c:
        yield c


@pytest.mark.parametrize("route", ["/predict", "/invocations", "/feedback"])
@fuzz
@given(body=json_values)
def test_any_json_gets_a_4xx_or_2xx(client, route, body):
    res = client.post(route, json=body)
    assert res.status_code < 500, (route, body, res.text)
    assert "detail" in res.json() or res.status_code == 200


@fuzz
@given(body=near_valid)
def test_near_valid_predictions_never_5xx(client, body):
    res = client.post("/predict", json=body)
    assert res.status_code < 500, res.text


@fuzz
@given(
    raw=st.binary(max_size=200),
    ctype=st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
    ),
)
def test_raw_bytes_never_5xx(client, raw, ctype):
    res = client.post("/predict", content=raw, headers={"content-type": ctype})
    assert res.status_code < 500, res.text
