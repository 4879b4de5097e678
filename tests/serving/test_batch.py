"""`mlops predict`: a file scored chunk by chunk through the registered model, as a user
runs it (the CLI on a project with a champion), with its output and log checked row by row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mlops.cli import app
from pipeline.config import get_settings
from pipeline.registry import load_predictor
from pipeline.store import PredictionStore

NAMES = [f"pixel{i}" for i in range(64)]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Blocks of 16 rows read, 10 scored at a time: every test crosses both boundaries.
    Logged, of 8-row requests (a logged run reads whole requests a block)."""
    monkeypatch.setattr("pipeline.batch.READ_BLOCK_ROWS", 16)
    monkeypatch.setattr("pipeline.batch.LOG_REQUEST_ROWS", 8)


@pytest.fixture
def predictor(served):
    import mlflow

    # this project's registry, whatever an earlier test pointed MLflow's global at
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    return load_predictor(get_settings().model_name, "1")[0]


def _frame(rows: np.ndarray, ids: bool = True) -> pd.DataFrame:
    frame = pd.DataFrame(rows.astype(np.int64), columns=NAMES)
    frame["pixel5"] = frame["pixel5"].astype(object)
    frame.loc[len(frame) - 1, "pixel5"] = 0.5  # a float in the last chunk only
    if ids:
        frame.insert(0, "id", [f"row-{i}" for i in range(len(frame))])
    return frame


def test_a_csv_in_small_chunks_matches_scoring_it_whole(served, predictor, digits_rows, tmp_path):
    frame = _frame(digits_rows[:53])
    source = tmp_path / "pixels.csv"
    frame.to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--chunk-rows", "10"])
    assert result.exit_code == 0, result.output
    assert "53 rows scored by digits-classifier v1" in result.output
    out = pd.read_csv(tmp_path / "pixels.predictions.csv")
    expected = predictor.predict_proba(frame[NAMES].to_numpy(np.float32))
    assert out["id"].tolist() == frame["id"].tolist()
    assert out["label"].tolist() == expected.argmax(1).tolist()
    np.testing.assert_allclose(out[[f"prob_{k}" for k in range(10)]], expected, atol=1e-6)
    assert PredictionStore(get_settings().prediction_db).create().count() == 0  # no --log


def test_parquet_with_log_lands_in_the_prediction_log(served, predictor, digits_rows, tmp_path):
    frame = _frame(digits_rows[:20], ids=False)
    source, out = tmp_path / "pixels.parquet", tmp_path / "scored.parquet"
    frame.to_parquet(source)
    result = runner.invoke(
        app, ["predict", str(source), "--out", str(out), "--log", "--chunk-rows", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "20 logged" in result.output
    scored = pd.read_parquet(out)
    assert len(scored) == 20 and scored["id"].is_unique  # generated, for /feedback
    logged = PredictionStore(get_settings().prediction_db).get(scored["id"].tolist())
    assert len(logged) == 20
    first = logged[scored["id"][0]]
    assert first["label"] == scored["label"][0] and first["model_version"] == "1"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f.drop(columns=["pixel7"]), "missing feature column(s) pixel7"),
        (lambda f: f.assign(pixel3=f["pixel3"].astype(str).where(f.index != 25, "")), "row 25"),
        (lambda f: f.assign(pixel3=f["pixel3"].astype(str).where(f.index != 31, "dark")), "dark"),
    ],
)
def test_a_bad_row_stops_the_run_and_writes_nothing(served, digits_rows, tmp_path, damage, message):
    source = tmp_path / "pixels.csv"
    damage(_frame(digits_rows[:40])).to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--chunk-rows", "10", "--log"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pixels.predictions.csv").exists()
    assert not list(tmp_path.glob(".*partial"))  # no partial file either


def test_unknown_model_and_format_say_so(served, tmp_path):
    source = tmp_path / "pixels.csv"
    source.write_text(",".join(NAMES) + "\n" + ",".join(["0"] * 64) + "\n")
    unknown = runner.invoke(app, ["predict", str(source), "--model", "9"])
    assert unknown.exit_code == 1 and "no version '9'" in unknown.output
    bad_out = runner.invoke(app, ["predict", str(source), "--out", str(tmp_path / "x.json")])
    assert bad_out.exit_code == 1 and "unknown format .json" in bad_out.output


def test_generated_ids_are_logged_as_request_records(
    served, predictor, digits_rows, tmp_path, monkeypatch
):
    """Rows without an id column go into the log as the server's requests do: one record
    of LOG_REQUEST_ROWS rows or fewer (here 6) each, not a row each; each row still found
    by its id and labelled through it."""
    import sqlalchemy as sa

    from pipeline.store import prediction_requests, predictions

    monkeypatch.setattr("pipeline.batch.LOG_REQUEST_ROWS", 6)
    frame = _frame(digits_rows[:20], ids=False)
    source, out = tmp_path / "pixels.csv", tmp_path / "scored.csv"
    frame.to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--out", str(out), "--log"])
    assert result.exit_code == 0, result.output
    assert "20 logged" in result.output
    scored = pd.read_csv(out)
    store = PredictionStore(get_settings().prediction_db)
    with store.engine.connect() as conn:
        sizes = conn.execute(sa.select(prediction_requests.c.n_rows)).scalars().all()
        rows = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one()
    assert sorted(sizes) == [2, 6, 6, 6] and rows == 0  # one block of 20 rows (chunk 8192)
    logged = store.get(scored["id"].tolist())
    assert [logged[i]["label"] for i in scored["id"]] == scored["label"].tolist()
    expected = frame[NAMES].to_numpy(np.float32)
    np.testing.assert_array_equal(
        np.stack([np.asarray(logged[i]["features"]) for i in scored["id"]]), expected
    )
    (outcome,) = store.add_labels([(scored["id"][7], 4)])
    assert outcome.status == "labelled"
    assert store.count(labelled=True) == 1


def test_a_file_that_fails_late_logs_nothing(served, digits_rows, tmp_path):
    """A bad row in the last block stops a logged run before any row is logged (the first
    pass checks the whole file): before, the blocks ahead of it stayed in the log under
    ids nobody received, and the run again after the fix logged them twice."""
    frame = _frame(digits_rows[:90])
    frame["pixel3"] = frame["pixel3"].astype(str).where(frame.index != 85, "")
    source = tmp_path / "pixels.csv"
    frame.to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--log", "--chunk-rows", "10"])
    assert result.exit_code == 1 and "row 85: column pixel3 is empty" in result.output
    assert not (tmp_path / "pixels.predictions.csv").exists()
    assert PredictionStore(get_settings().prediction_db).create().count() == 0


def test_a_store_that_fails_mid_run_says_what_was_logged(
    served, digits_rows, tmp_path, monkeypatch
):
    """The file passed its check, so what stops a logged run half-way is the store: the
    error names the rows that went in before it."""
    from pipeline.store import StoreUnavailable

    real, calls = PredictionStore.insert_requests, []

    def failing(self, requests, blocking=True):
        calls.append(len(requests))
        if len(calls) == 3:
            raise StoreUnavailable("prediction store x: disk I/O error")
        return real(self, requests, blocking)

    monkeypatch.setattr(PredictionStore, "insert_requests", failing)
    source = tmp_path / "pixels.csv"
    _frame(digits_rows[:40]).to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--log", "--chunk-rows", "10"])
    assert result.exit_code == 1, result.output
    assert "disk I/O error; rows 0-31 were scored and 32 of them logged" in result.output
    assert PredictionStore(get_settings().prediction_db).count() == 32


def _with_ids(frame: pd.DataFrame, changes: dict[int, str]) -> pd.DataFrame:
    frame["id"] = [changes.get(i, f"ok-{i}") for i in range(len(frame))]
    return frame


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({0: "dup", 1: "dup"}, "row 1: id 'dup' is also the id of row 0"),
        ({3: "again", 30: "again"}, "row 30: id 'again' is also the id of row 3"),  # blocks apart
        ({2: "é-unicode"}, "row 2: column id has id 'é-unicode'"),
        ({3: "with space"}, "row 3: column id has id 'with space'"),
        ({4: "x" * 200}, f"row 4: column id has id '{'x' * 40}' (200 characters)"),
        ({33: ""}, "row 33: column id has an empty id"),
        # the attack's file: the first bad row in file order is named, whichever check finds it
        (
            {0: "dup", 1: "dup", 2: "é-unicode", 3: "with space", 4: "x" * 200},
            "row 1: id 'dup' is also the id of row 0",
        ),
        ({5: "ok-1", 7: "with space"}, "row 5: id 'ok-1' is also the id of row 1"),
        ({5: "with space", 7: "ok-1"}, "row 5: column id has id 'with space'"),
    ],
)
def test_logged_ids_are_refused_as_the_server_refuses_them(
    served, digits_rows, tmp_path, changes, message
):
    """With --log every id must be one /feedback takes (1-128 printable ASCII characters) and
    each row's own: the whole file is refused before any row is logged. Before, a repeated
    id was logged once (the log keeps the first) while the output showed both rows, and an
    id /feedback refuses was logged under a row that could never be labelled."""
    source = tmp_path / "pixels.csv"
    _with_ids(_frame(digits_rows[:40]), changes).to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--log", "--chunk-rows", "10"])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()), result.output  # the console wraps
    assert not (tmp_path / "pixels.predictions.csv").exists()
    assert PredictionStore(get_settings().prediction_db).create().count() == 0


def test_without_log_ids_are_only_copied(served, digits_rows, tmp_path):
    """Without --log the ids go to the output as they are: nothing joins labels to them."""
    source = tmp_path / "pixels.csv"
    _with_ids(_frame(digits_rows[:20]), {0: "dup", 1: "dup", 2: "with space"}).to_csv(
        source, index=False
    )
    result = runner.invoke(app, ["predict", str(source)])
    assert result.exit_code == 0, result.output
    out = pd.read_csv(tmp_path / "pixels.predictions.csv")
    assert out["id"].tolist()[:3] == ["dup", "dup", "with space"]


def test_the_id_none_is_an_id(served, digits_rows, tmp_path):
    """The text "None" in the id column is an id like any other (it was refused as empty),
    logged and given back; an empty cell is refused with its row."""
    source = tmp_path / "pixels.csv"
    _with_ids(_frame(digits_rows[:40]), {3: "None"}).to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--log", "--chunk-rows", "10"])
    assert result.exit_code == 0 and "40 logged" in result.output, result.output
    out = pd.read_csv(tmp_path / "pixels.predictions.csv", keep_default_na=False)
    assert out["id"][3] == "None"
    assert (
        PredictionStore(get_settings().prediction_db).get(["None"])["None"]["label"]
        == (out["label"][3])
    )
    _with_ids(_frame(digits_rows[:40]), {21: ""}).to_csv(source, index=False)
    empty = runner.invoke(app, ["predict", str(source), "--chunk-rows", "10"])  # no --log
    assert empty.exit_code == 1 and "row 21: column id has an empty id" in empty.output


def test_ids_already_logged_are_kept_for_the_same_rows_and_refused_for_others(
    served, digits_rows, tmp_path
):
    """A second run of the same rows logs none of them again and says so; a file that gives
    a logged id to other features is refused before anything is logged (before, its rows
    were left out of the log without a word and their labels went to the first file's)."""
    store = PredictionStore(get_settings().prediction_db).create()
    source = tmp_path / "pixels.csv"
    _with_ids(_frame(digits_rows[:40]), {}).to_csv(source, index=False)
    args = ["predict", str(source), "--log", "--chunk-rows", "10"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "0 logged" in again.output
    assert "40 were in the log already under their ids" in " ".join(again.output.split())
    assert store.count() == 40

    _with_ids(_frame(digits_rows[40:80]), {}).to_csv(source, index=False)  # ok-0.. again
    clash = runner.invoke(app, args)
    assert clash.exit_code == 1, clash.output
    assert "row 0: id 'ok-0' is already in the prediction log for another row (logged by" in (
        " ".join(clash.output.split())
    )
    assert store.count() == 40


def test_a_run_again_after_the_store_failed_logs_the_rest_once(
    served, digits_rows, tmp_path, monkeypatch
):
    """Ids from a column: the run again after a store failure logs the rows the first run
    did not reach and counts the others as logged already."""
    from pipeline.store import StoreUnavailable

    real = PredictionStore.insert_requests
    calls = []

    def failing(self, requests, blocking=True):
        calls.append(1)
        if len(calls) == 2:
            raise StoreUnavailable("prediction store x: disk I/O error")
        return real(self, requests, blocking)

    source = tmp_path / "pixels.csv"
    _with_ids(_frame(digits_rows[:40]), {}).to_csv(source, index=False)
    args = ["predict", str(source), "--log", "--chunk-rows", "10"]
    with monkeypatch.context() as patch:
        patch.setattr(PredictionStore, "insert_requests", failing)
        assert runner.invoke(app, args).exit_code == 1
    assert PredictionStore(get_settings().prediction_db).count() == 16
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())  # the console wraps
    assert "24 logged" in said and "16 were in the log already" in said
    assert PredictionStore(get_settings().prediction_db).count() == 40
    assert pd.read_csv(tmp_path / "pixels.predictions.csv")["id"].tolist() == [
        f"ok-{i}" for i in range(40)
    ]


def test_generated_ids_name_the_same_rows_alike_in_every_run(
    served, digits_rows, tmp_path, monkeypatch
):
    """Ids made for a file without an id column come from its rows: a run again after the
    store failed half-way (here with other chunks, so other blocks) names the rows as the
    first did, logs those it had not reached and no row twice; before, every run drew new
    ids and logged the first run's rows a second time. Other rows get other ids."""
    from pipeline.store import StoreUnavailable

    monkeypatch.setattr("pipeline.batch.LOG_REQUEST_ROWS", 6)
    real, calls = PredictionStore.insert_requests, []

    def failing(self, requests, blocking=True):
        calls.append(1)
        if len(calls) == 2:
            raise StoreUnavailable("prediction store x: disk I/O error")
        return real(self, requests, blocking)

    source, out = tmp_path / "pixels.csv", tmp_path / "scored.csv"
    _frame(digits_rows[:40], ids=False).to_csv(source, index=False)
    args = ["predict", str(source), "--out", str(out), "--log"]
    with monkeypatch.context() as patch:
        patch.setattr(PredictionStore, "insert_requests", failing)
        failed = runner.invoke(app, [*args, "--chunk-rows", "10"])  # blocks of 18 rows
    assert failed.exit_code == 1, failed.output
    store = PredictionStore(get_settings().prediction_db)

    again = runner.invoke(app, args)  # one block of 40 rows
    said = " ".join(again.output.split())
    assert store.count() == 40
    assert again.exit_code == 0 and "22 logged" in said and "18 were in the log already" in said
    scored = pd.read_csv(out)
    logged = store.get(scored["id"].tolist())
    assert [logged[i]["label"] for i in scored["id"]] == scored["label"].tolist()
    np.testing.assert_array_equal(
        np.stack([np.asarray(logged[i]["features"]) for i in scored["id"]]),
        _frame(digits_rows[:40], ids=False)[NAMES].to_numpy(np.float32),
    )

    third = runner.invoke(app, args)
    assert third.exit_code == 0 and "40 were in the log already" in " ".join(third.output.split())
    assert pd.read_csv(out)["id"].tolist() == scored["id"].tolist() and store.count() == 40

    _frame(digits_rows[40:80], ids=False).to_csv(source, index=False)
    other = runner.invoke(app, args)
    assert other.exit_code == 0 and "40 logged" in other.output and store.count() == 80
    assert not set(pd.read_csv(out)["id"]) & set(scored["id"])


def _logged_run_rewritten_after_check(monkeypatch, source, rewritten: pd.DataFrame) -> str:
    """`mlops predict SOURCE --log` with SOURCE rewritten as `rewritten` between the
    check and the logging pass; the run must fail: its output, unwrapped."""
    import pipeline.batch

    real = pipeline.batch._check

    def check_then_rewrite(*args, **kw):
        checked = real(*args, **kw)
        rewritten.to_csv(source, index=False)
        return checked

    monkeypatch.setattr(pipeline.batch, "_check", check_then_rewrite)
    result = runner.invoke(app, ["predict", str(source), "--log", "--chunk-rows", "10"])
    assert result.exit_code == 1, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("ids", [True, False])
def test_a_file_changed_after_its_check_stops_at_the_changed_block(
    served, digits_rows, tmp_path, monkeypatch, ids
):
    """The logging pass reads the rows the check read, block by block: a file written to
    in between stops the run at the first block that changed, before it is logged (its
    ids were checked for other rows, or made from other rows)."""
    source = tmp_path / "pixels.csv"
    frame = _frame(digits_rows[:40], ids=ids)
    frame.to_csv(source, index=False)
    changed = frame.copy()
    changed.loc[20, "pixel9"] = 16 - changed.loc[20, "pixel9"]
    said = _logged_run_rewritten_after_check(monkeypatch, source, changed)
    assert "rows 16-31 are not the rows checked (the file changed while it was scored)" in said
    assert "rows 0-15 were scored and 16 of them logged before it" in said
    assert PredictionStore(get_settings().prediction_db).count() == 16
    assert not (tmp_path / "pixels.predictions.csv").exists()


def test_a_file_cut_short_after_its_check_at_a_blocks_end_is_not_taken_as_whole(
    served, digits_rows, tmp_path, monkeypatch
):
    """A file cut at a block's end between the passes: every block read matches its
    check, but the run stops where the checked rows went on, with no output (it ended
    early and said nothing)."""
    source = tmp_path / "pixels.csv"
    frame = _frame(digits_rows[:40])
    frame.to_csv(source, index=False)
    said = _logged_run_rewritten_after_check(monkeypatch, source, frame.iloc[:32])  # 2 blocks
    assert "ends at row 31, where the rows checked went on" in said
    assert "all 32 were scored and 32 logged (no output written)" in said
    assert not (tmp_path / "pixels.predictions.csv").exists()


def test_generated_ids_are_the_scoring_versions_own(served, digits_rows, tmp_path):
    """The same rows scored again by the same version are that version's rows already
    (nothing logged twice); scored by another version they are its own predictions,
    logged under other ids (the ids were made from the rows alone, so a new version's run
    logged nothing and the log kept the old version's answers)."""
    from pipeline.batch import predict_file
    from pipeline.registry import load_predictor
    from pipeline.tracking import configure_tracking

    settings = get_settings()
    configure_tracking(settings)
    predictor, _ = load_predictor(settings.model_name, "1")
    store = PredictionStore(settings.prediction_db).create()
    source = tmp_path / "pixels.csv"
    _frame(digits_rows[:40], ids=False).to_csv(source, index=False)

    def run(version: str, out: str):
        return predict_file(
            source, tmp_path / out, predictor, settings.model_name, version, store=store
        )

    assert [run(v, f"{k}.csv").logged for k, v in enumerate("112")] == [40, 0, 40]
    assert store.count() == 80
    newer = pd.read_csv(tmp_path / "2.csv")["id"].tolist()
    assert {r["model_version"] for r in store.get(newer).values()} == {"2"}
    assert not set(newer) & set(pd.read_csv(tmp_path / "0.csv")["id"])


def test_a_cell_that_is_no_number_is_named_by_its_column(served, digits_rows, tmp_path):
    """pyarrow says "In CSV column #4: CSV conversion error to double: invalid value
    'oops'" (a 0-based index, no row); the command names the column and the value."""
    source = tmp_path / "pixels.csv"
    frame = _frame(digits_rows[:40]).astype({"pixel3": object})
    frame.loc[25, "pixel3"] = "oops"
    frame.to_csv(source, index=False)
    result = runner.invoke(app, ["predict", str(source), "--log"])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "column pixel3 holds 'oops', which is not a number" in said, said
    assert PredictionStore(get_settings().prediction_db).count() == 0
