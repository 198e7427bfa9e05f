"""Drift monitoring with the real models: the default sklearn classifier (built here, fixed seed) and
all-MiniLM-L6-v2, over both window kinds (Redis, shared by workers; in-process), and the route."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from scipy.stats import chi2_contingency
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from app.errors import APIError
from app.governance.drift import DriftMonitor, DriftSettings, monitor, observe_tabular, observe_texts
from app.governance.drift.reference import References, read_texts
from app.governance.drift.stats import chi2_homogeneity
from app.governance.drift.window import ALL_TENANTS, Window
from app.inference import training
from app.inference.catalogue import catalogue
from config import ROOT
from tests import support

SKLEARN = "breast-cancer-classifier"
TENANT = "0123456789abcdef0123456789abcdef"  # whose inputs the direct observations stand for
SHIFTED = ("mean radius", "texture error", "worst smoothness")
CATALOGUE = f"""
models:
  - name: {SKLEARN}
    backend: sklearn
    params:
      artifact: breast-cancer/1/model.skops
"""
TEXT_CATALOGUE = """
models:
  - name: minilm
    backend: sentence_transformers
    limits:
      max_batch_size: 32
  - name: vader
    backend: vader
"""
NON_ENGLISH = [
    "Wie kann ich mein Passwort zurücksetzen, wenn ich keinen Zugriff mehr auf mein E-Mail-Konto habe?",
    "Das Paket kam zwei Tage zu spät an und der Karton war beschädigt.",
    "Welche Zimmerpflanzen sind für Katzen und Hunde ungefährlich?",
    "Ich möchte mein Abonnement zum Ende des Monats kündigen.",
    "Wann schließt die Apotheke in der Hauptstraße am Sonntag?",
    "Bitte fasse die wichtigsten Punkte des Quartalsberichts zusammen.",
    "Quelle est la différence entre un virus et une bactérie ?",
    "Pouvez-vous me recommander un bon livre sur l'histoire de l'Empire romain ?",
    "Le train était bondé, alors j'ai dû rester debout pendant tout le trajet.",
    "Comment puis-je améliorer mon sommeil sans prendre de médicaments ?",
    "J'ai perdu mon portefeuille dans le bus ce matin.",
    "Écrivez un courriel poli pour refuser une réunion mardi prochain.",
    "¿A qué hora cierra la farmacia de la calle principal los domingos?",
    "Necesito una lista de equipaje para una semana de senderismo en la montaña.",
    "El hotel estaba limpio pero el aire acondicionado no funcionaba.",
    "¿Cómo puedo quitar una mancha de vino tinto de la alfombra?",
    "Mi vuelo fue cancelado y necesito saber mis derechos.",
    "Dame una receta sencilla de sopa de verduras.",
    "Come posso migliorare il mio sonno senza prendere farmaci?",
    "Il concerto era troppo rumoroso ma la band ha suonato tutte le vecchie canzoni.",
    "Vorrei prenotare un tavolo per quattro persone alle sette.",
    "Hoe kan ik mijn wachtwoord opnieuw instellen?",
    "Ik ben mijn paraplu gisteren in de bibliotheek vergeten.",
    "Onze internetverbinding valt elke avond rond acht uur weg.",
]


def code_snippets(count: int, seed: int) -> list[str]:
    """Source code of the kind pasted into a chat: longer than, and unlike, the reference sentences."""
    rng = np.random.default_rng(seed)
    verbs = ["load", "parse", "merge", "filter", "group", "render", "fetch", "sync", "index", "score"]
    nouns = ["orders", "users", "events", "rows", "tokens", "invoices", "frames", "paths", "jobs", "keys"]
    snippets = []
    for _ in range(count):
        verb, noun, attr = rng.choice(verbs), rng.choice(nouns), rng.choice(nouns)
        limit = int(rng.integers(2, 500))
        snippets.append(
            f"def {verb}_{noun}(items, limit={limit}):\n"
            f"    result = []\n"
            f"    for i, item in enumerate(items):\n"
            f"        if i >= limit or item.{attr} is None:\n"
            f"            continue\n"
            f"        result.append({{'id': item.id, '{attr}': item.{attr}}})\n"
            f"    return sorted(result, key=lambda r: r['{attr}'])[:{limit}]"
        )
    return snippets


# --- tabular: the default sklearn classifier --------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("models")
    support.build_default_models(path)
    return path


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    """The classifier's own split: training rows are its reference, held-out rows were never seen."""
    data = load_breast_cancer()
    x_train, x_test, _, _ = train_test_split(
        data.data,
        data.target,
        test_size=training.TEST_SIZE,
        stratify=data.target,
        random_state=training.SEED,
    )
    return x_train, x_test


@pytest.fixture(params=["memory", "redis"])
def app_env(request: pytest.FixtureRequest, models_dir, tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    env = {"MODELS_CONFIG": str(path), "MODELS_DIR": str(models_dir)}
    if request.param == "redis":
        url = support.require_service("TEST_REDIS_URL")
        support.flush_redis(url)
        env["REDIS_URL"] = url
    return env


def observe_in_requests(rows: np.ndarray, seed: int = 0, tenant: str = TENANT) -> None:
    """As the request path would: batches of 1-8 rows, one call each."""
    rng = np.random.default_rng(seed)
    start = 0
    while start < len(rows):
        size = int(rng.integers(1, 9))
        observe_tabular(tenant, SKLEARN, "1", rows[start : start + size])
        start += size


def tabular_report(app, rows: np.ndarray) -> dict:
    with app.test_request_context():
        observe_in_requests(rows)
        report = monitor().report(SKLEARN)
    assert report["model"] == SKLEARN
    (version,) = report["versions"]
    assert version["version"] == "1" and version["kind"] == "tabular"
    return version


def test_heldout_rows_are_not_flagged(app, split):
    _, x_test = split
    rows = np.random.default_rng(7).permutation(x_test)  # all 143 held-out rows, never trained on
    version = tabular_report(app, rows)
    assert version["status"] == "ok" and version["sample_size"] == len(x_test)
    assert version["drifted"] is False and version["drifted_features"] == []
    assert len(version["features"]) == 30
    assert all(f["test"] == "chi2" and f["psi"] < 0.2 for f in version["features"])


def test_a_full_window_of_training_rows_is_not_flagged(app, split):
    x_train, _ = split
    rows = x_train[np.random.default_rng(11).integers(0, len(x_train), 1200)]
    version = tabular_report(app, rows)
    assert version["sample_size"] == 1000  # DRIFT_WINDOW: the oldest 200 fell out
    assert version["drifted"] is False
    assert max(f["psi"] for f in version["features"]) < 0.1


def test_shifted_features_are_flagged_and_named(app, split):
    _, x_test = split
    rows = np.random.default_rng(7).permutation(x_test)
    names = load_breast_cancer().feature_names.tolist()
    for name in SHIFTED:
        column = names.index(name)
        rows[:, column] += 2 * x_test[:, column].std()
    version = tabular_report(app, rows)
    assert version["status"] == "ok" and version["drifted"] is True
    assert sorted(version["drifted_features"]) == sorted(SHIFTED)
    by_name = {f["name"]: f for f in version["features"]}
    for name in SHIFTED:
        assert by_name[name]["psi"] > 1 and by_name[name]["p_value"] < 1e-10


def test_too_few_inputs_are_not_judged(app, split):
    x_train, _ = split
    shifted = x_train[:50] * 3
    version = tabular_report(app, shifted)
    assert version["status"] == "insufficient_data" and version["sample_size"] == 50
    assert version["drifted"] is False and version["features"] == []


def metric_value(client, name: str, **labels: str) -> float | None:
    text = client.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_route_end_to_end(app, client, database_url, split):
    _, x_test = split
    reader = support.issue_key(database_url, scopes=("governance:read",))
    invoker = support.issue_key(database_url)
    auth = {"Authorization": f"Bearer {reader}"}
    rows = x_test.copy()
    rows[:, 0] += 2 * x_test[:, 0].std()
    tenant = client.get("/v1/auth/me", headers=auth).get_json()["tenant_id"]
    # What the v2 infer route's request path records after a successful call.
    with app.test_request_context():
        observe_in_requests(rows, tenant=tenant)

    resp = client.get(f"/v1/governance/models/{SKLEARN}/drift", headers=auth)
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["drifted"] is True and body["window"] == 1000 and body["min_samples"] == 100
    assert body["thresholds"] == {"psi": 0.2, "p_value": 0.01, "centroid_distance": 0.3}
    (version,) = body["versions"]
    assert version["drifted_features"] == ["mean radius"] and version["sample_size"] == len(rows)
    psi = next(f["psi"] for f in version["features"] if f["name"] == "mean radius")
    labels = {"model": SKLEARN, "version": "1"}
    assert metric_value(client, "gateway_model_drift_psi", feature="mean radius", **labels) == pytest.approx(
        psi
    )
    assert metric_value(client, "gateway_model_drifted", **labels) == 1

    missing = client.get("/v1/governance/models/nope/drift", headers=auth)
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "model_not_found"
    denied = client.get(
        f"/v1/governance/models/{SKLEARN}/drift", headers={"Authorization": f"Bearer {invoker}"}
    )
    assert denied.status_code == 403 and denied.get_json()["error"]["code"] == "insufficient_scope"


def test_the_v2_route_observes_only_calls_that_succeeded(app, client, database_url, split):
    """The real classifier through POST /v2/models/<name>/infer: the rows of a call that failed
    after the model ran (an unknown output asked for) never reach the window."""
    _, x_test = split
    key = support.issue_key(database_url, scopes=("inference:invoke", "governance:read"))
    auth = {"Authorization": f"Bearer {key}"}

    def infer(rows: np.ndarray, **extra: object):
        data = rows.ravel().tolist()
        tensor = {"name": "input__0", "shape": list(rows.shape), "datatype": "FP64", "data": data}
        return client.post(f"/v2/models/{SKLEARN}/infer", headers=auth, json={"inputs": [tensor], **extra})

    for start in range(0, 40, 8):
        resp = infer(x_test[start : start + 8])
        assert resp.status_code == 200, resp.get_json()
    failed = infer(x_test[40:50], outputs=[{"name": "nope"}])
    assert failed.status_code == 400 and failed.get_json()["error"]["param"] == "outputs"

    resp = client.get(f"/v1/governance/models/{SKLEARN}/drift", headers=auth)
    assert resp.status_code == 200, resp.get_json()
    (version,) = resp.get_json()["versions"]
    assert (version["version"], version["status"], version["sample_size"]) == ("1", "insufficient_data", 40)


def test_a_tenant_sees_only_the_drift_of_its_own_inputs(app, client, database_url, split):
    """Through the real v2 route: B's calls move neither A's sample size nor A's statistics; the
    platform admin sees both tenants together, or one of them, and no tenant may read another's."""
    _, x_test = split
    scopes = ("inference:invoke", "governance:read")
    a = {"Authorization": f"Bearer {support.issue_key(database_url, 'tenant-a', scopes)}"}
    b = {"Authorization": f"Bearer {support.issue_key(database_url, 'tenant-b', scopes)}"}
    admin = {"Authorization": f"Bearer {support.issue_key(database_url, 'platform', ('admin',))}"}
    a_id = client.get("/v1/auth/me", headers=a).get_json()["tenant_id"]

    def infer(headers: dict[str, str], rows: np.ndarray) -> None:
        tensor = {
            "name": "input__0",
            "shape": list(rows.shape),
            "datatype": "FP64",
            "data": rows.ravel().tolist(),
        }
        resp = client.post(f"/v2/models/{SKLEARN}/infer", headers=headers, json={"inputs": [tensor]})
        assert resp.status_code == 200, resp.get_json()

    def report(headers: dict[str, str], **query: str) -> dict:
        resp = client.get(f"/v1/governance/models/{SKLEARN}/drift", headers=headers, query_string=query)
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()

    infer(a, x_test[:8])
    infer(a, x_test[8:15])
    before = report(a)
    assert before["versions"][0]["sample_size"] == 15
    infer(b, x_test[15:20] * 3)  # five rows unlike A's
    after = report(a)
    assert after["versions"] == before["versions"]
    assert before["tenant_id"] == after["tenant_id"] == a_id
    assert report(b)["versions"][0]["sample_size"] == 5
    everyone = report(admin)
    assert everyone["tenant_id"] is None and everyone["versions"][0]["sample_size"] == 20
    assert report(admin, tenant_id=a_id)["versions"] == before["versions"]
    denied = client.get(f"/v1/governance/models/{SKLEARN}/drift?tenant_id={a_id}", headers=b)
    assert denied.status_code == 403 and denied.get_json()["error"]["code"] == "cross_tenant"


def test_periodic_refresh_updates_the_gauges(app, client, split):
    x_train, _ = split
    rows = x_train[np.random.default_rng(12345).integers(0, len(x_train), 300)]
    with app.test_request_context():
        drift = DriftMonitor(DriftSettings(interval_s=0.2), app.extensions.get("redis_client"))
        drift.observe_rows(TENANT, SKLEARN, "1", rows)
        expected = next(
            f["psi"] for f in drift.report(SKLEARN)["versions"][0]["features"] if f["name"] == "mean area"
        )
        drift.observe_rows(TENANT, SKLEARN, "1", rows)  # the window changes; only a refresh can publish it
    labels = {"model": SKLEARN, "version": "1", "feature": "mean area"}
    assert metric_value(client, "gateway_model_drift_psi", **labels) == pytest.approx(expected)
    drift.start(app)
    try:
        deadline = time.monotonic() + 10
        while metric_value(client, "gateway_model_drift_psi", **labels) == pytest.approx(expected):
            assert time.monotonic() < deadline, "the periodic refresh never published"
            time.sleep(0.1)
    finally:
        drift.stop()


def test_chi2_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(100):
        bins = int(rng.integers(2, 11))
        reference, live = rng.integers(0, 60, bins), rng.integers(0, 200, bins)
        table = np.vstack([reference, live])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] > 1:
            expected = chi2_contingency(table, correction=False).pvalue
            assert chi2_homogeneity(reference, live) == pytest.approx(expected, rel=1e-9, abs=1e-300)


# --- windows ----------------------------------------------------------------------------------


def test_workers_share_one_redis_window(redis_url):
    clients = [Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    first, second = (Window(100, client) for client in clients)
    key = (ALL_TENANTS, "m", "1", "rows")
    first.append(key, np.full((60, 3), 1.0))
    second.append(key, np.full((60, 3), 2.0))
    assert len(first.read(key)) == 60  # the second worker has not flushed yet (at most 1 s)
    second.flush()
    window = np.vstack(first.read(key))
    assert window.shape == (100, 3)  # capped, newest first
    assert (window[:60] == 2.0).all() and (window[60:] == 1.0).all()
    assert first.observed() == {("m", "1")}
    time.sleep(1.05)
    first.append(key, np.full((1, 3), 3.0))  # due: flushed inline by the appending request
    assert clients[1].lindex("drift:window:*:m:1:rows", 0) is not None
    assert (np.vstack(second.read(key))[0] == 3.0).all()


def test_redis_down_never_fails_the_request_path(app):
    unreachable = Redis.from_url(f"redis://127.0.0.1:{support.free_port()}/0", socket_timeout=0.2)
    with app.test_request_context():
        drift = DriftMonitor(DriftSettings(), unreachable)
        for _ in range(3):
            drift.observe_rows(TENANT, SKLEARN, "1", np.ones((2, 30)))
            drift.window.flush()
        with pytest.raises(APIError) as raised:
            drift.report(SKLEARN)
    assert raised.value.status == 503 and raised.value.code == "drift_unavailable"


# --- text: all-MiniLM-L6-v2 (length and centroid) and VADER (length only) ---------------------


@pytest.fixture(scope="module")
def reference_lines() -> tuple[list[str], list[str]]:
    """The shipped reference sample split in two: one half is the reference, the other live traffic."""
    lines = read_texts(ROOT / "config" / "drift_reference_texts.txt")
    assert len(lines) >= 200
    return lines[0::2], lines[1::2]


@pytest.fixture(scope="module", params=["memory", "redis"])
def text_app(request, sqlite_template, reference_lines, tmp_path_factory):
    from app import create_app

    path = tmp_path_factory.mktemp("text")
    (path / "models.yaml").write_text(TEXT_CATALOGUE)
    (path / "reference.txt").write_text("\n".join(reference_lines[0]))
    config = {
        "SQLALCHEMY_DATABASE_URI": support.copy_sqlite(sqlite_template, path / "test.db"),
        "MODELS_CONFIG": str(path / "models.yaml"),
        "MODELS_DIR": str(path),
        "DRIFT_REFERENCE_TEXTS": str(path / "reference.txt"),
    }
    if request.param == "redis":
        config["REDIS_URL"] = support.require_service("TEST_REDIS_URL")
        support.flush_redis(config["REDIS_URL"])
    application = create_app(config)
    with application.app_context():
        settings = DriftSettings.from_config(application.config)
        references = References(settings.reference_texts, application.extensions.get("redis_client"))
        yield application, settings, references


_embeddings: dict[tuple[str, ...], np.ndarray] = {}


def clear_shared_windows(application, model: str) -> None:
    """Each text test starts from an empty window; in Redis the module's earlier tests left theirs."""
    redis = application.extensions.get("redis_client")
    if redis is not None:
        redis.delete(
            *(
                f"drift:window:{scope}:{model}:1:{series}"
                for scope in (ALL_TENANTS, TENANT)
                for series in ("lengths", "embeddings")
            )
        )


def text_report(text_app, model: str, texts: list[str], embed: bool) -> dict:
    """A fresh window (one 'worker'), the texts observed as requests of 8, and the model's report."""
    application, settings, references = text_app
    clear_shared_windows(application, model)
    drift = DriftMonitor(settings, application.extensions.get("redis_client"), references)
    if embed and tuple(texts) not in _embeddings:
        _embeddings[tuple(texts)] = catalogue().get(model).embed(texts, None).vectors
    for start in range(0, len(texts), 8):
        batch = texts[start : start + 8]
        drift.observe_texts(
            TENANT, model, "1", batch, _embeddings[tuple(texts)][start : start + 8] if embed else None
        )
    (version,) = drift.report(model)["versions"]
    assert version["kind"] == "text" and version["status"] == "ok"
    return version


def test_text_like_the_reference_is_not_flagged(text_app, reference_lines):
    live = reference_lines[1]
    version = text_report(text_app, "minilm", live, embed=True)
    assert version["drifted"] is False, version
    (length,) = version["features"]
    assert length["name"] == "length" and length["test"] == "ks"
    embedding = version["embedding"]
    assert embedding["status"] == "ok" and embedding["sample_size"] == len(live)
    assert embedding["centroid_distance"] < 0.2


def test_code_is_flagged_by_length_and_centroid(text_app):
    version = text_report(text_app, "minilm", code_snippets(120, seed=3), embed=True)
    assert version["drifted"] is True
    assert version["drifted_features"] == ["length", "embedding_centroid"]
    assert version["embedding"]["centroid_distance"] > 0.5


def test_non_english_is_flagged_by_centroid(text_app):
    live = [NON_ENGLISH[i] for i in np.random.default_rng(5).integers(0, len(NON_ENGLISH), 120)]
    version = text_report(text_app, "minilm", live, embed=True)
    assert version["drifted"] is True and "embedding_centroid" in version["drifted_features"]
    assert version["embedding"]["centroid_distance"] > 0.5


def test_a_model_that_does_not_embed_is_judged_on_length(text_app, reference_lines):
    calm = text_report(text_app, "vader", reference_lines[1], embed=False)
    assert calm["drifted"] is False and calm["embedding"] is None
    shifted = text_report(text_app, "vader", code_snippets(120, seed=4), embed=False)
    assert shifted["drifted"] is True and shifted["drifted_features"] == ["length"]


def test_public_observe_texts_feeds_the_apps_window(text_app, reference_lines):
    application, _, _ = text_app
    clear_shared_windows(application, "vader")
    with application.test_request_context():
        observe_texts(TENANT, "vader", "1", reference_lines[1][:10], None)
        (version,) = monitor().report("vader")["versions"]
    assert version["status"] == "insufficient_data" and version["sample_size"] == 10
