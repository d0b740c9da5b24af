"""Model versions: heads stored in the models bucket, `d3 models add|list|activate`, GET /models,
PUT /models/active, and switching the engine without a restart and without mixing heads in a request."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from api.config import load_settings
from api.detector import DetectorConfig, InferenceEngine, build_model, preprocess_image
from api.detector.model import build_head
from api.detector.training import CARD_FORMAT, save_head
from api.detector.weights import head_dim
from tests.helpers import TINY_MODEL, app_settings, image_bytes, make_app, post_form

FAST = {"RATE_LIMIT_DEFAULT": "100000/minute", "RATE_LIMIT_VIDEO": "10000/minute", "MODEL_VERSION_POLL_S": "0.2",
        "RECONCILE_INTERVAL_S": "0"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- heads, cards and their expected scores ------------------------------------------------------------
def write_head(path: Path, seed: int, bias: float) -> Path:
    """A head of the tiny backbone in the authors' layout; `bias` moves its scores well away from others'."""
    head = build_head(head_dim("d3-tiny"), seed=seed)
    with torch.no_grad():
        head.fc.weight.mul_(40.0)
        head.fc.bias.fill_(bias)
    save_head(head, path)
    return path


def write_card(head_path: Path, threshold: float | None = 0.37, **extra) -> Path:
    import hashlib

    card = {"format": CARD_FORMAT, "head_sha256": hashlib.sha256(head_path.read_bytes()).hexdigest(),
            "created_at": "2026-12-01T10:00:00Z", "threshold": threshold,
            "validation": {"start": {"ap": 0.5, "accuracy": 0.5}, "trained": {"ap": 0.91, "accuracy": 0.84}},
            **extra}
    path = head_path.with_name(head_path.stem + ".card.json")
    path.write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("heads")
    return {"a": write_head(folder / "a.pth", 11, -1.5), "b": write_head(folder / "b.pth", 12, 1.5)}


@pytest.fixture(scope="module")
def reference_model():
    """The factory's tiny model, used outside any engine to compute what each head must score."""
    return build_model(DetectorConfig.from_settings(load_settings(TINY_MODEL)))


def expected_scores(model, head_path: Path | None, images: list[bytes]) -> list[float]:
    """Scores of these images by the plain model forward with this head loaded (None: the configured one)."""
    original = {k: v.clone() for k, v in model.head.state_dict().items()}
    try:
        if head_path is not None:
            model.head.load_state_dict(torch.load(head_path, weights_only=True))
        x = torch.stack([preprocess_image(Image.open(io.BytesIO(data))) for data in images])
        with torch.inference_mode():
            return model(x).tolist()
    finally:
        model.head.load_state_dict(original)


@pytest.fixture(scope="module")
def engine():
    """An engine of this module's own (the session's shared one must not follow a test's database)."""
    engine = InferenceEngine(DetectorConfig.from_settings(load_settings(TINY_MODEL)))
    engine.start()
    assert engine.wait_ready(120), engine.load_error
    yield engine
    engine.stop()


def versioned_app(tmp_path, engine, **overrides):
    app = make_app(tmp_path, engine, **FAST, **overrides)
    svc = app.extensions["d3"]
    engine.attach_versions(svc.model_versions, 0.2)
    return app


def admin_headers(app) -> dict[str, str]:
    _, key = app.extensions["d3"].keys.create("ops", True)
    return {"Authorization": f"Bearer {key}"}


def user_headers(app) -> dict[str, str]:
    _, key = app.extensions["d3"].keys.create("analytics", False)
    return {"Authorization": f"Bearer {key}"}


def upload_head(client, headers, head: Path, card: Path | None = None, name: str | None = None):
    fields: list = [("head", (head.name, head.read_bytes()))]
    if card is not None:
        fields.append(("card", (card.name, card.read_bytes())))
    path = "/models" + (f"?name={name}" if name else "")
    return post_form(client, path, fields, headers=headers)


def activate(client, headers, **body):
    return client.put("/models/active", json=body, headers=headers)


def stored_keys(app) -> list[str]:
    svc = app.extensions["d3"]
    return sorted(key for key, _ in svc.store.list_objects(svc.settings.bucket_models))


# -- the command line ---------------------------------------------------------------------------------
def test_d3_models_add_list_activate_and_refuse_a_bad_head(tmp_path, heads):
    from api.cli import cli
    from api.database import upgrade_schema

    env = {**app_settings(tmp_path)}
    upgrade_schema(f"sqlite:///{tmp_path / 'instance' / 'd3.sqlite'}")
    runner = CliRunner()

    def d3(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    card = write_card(heads["a"], threshold=0.37)
    out = d3("models", "add", heads["a"], "--name", "mine")  # the card beside it is found by itself
    assert "sha256:" in out and "added" in out and "d3 models activate mine" in out
    listing = json.loads(d3("models", "list", "--json"))
    assert listing["active"] is None
    [version] = listing["versions"]
    assert version["name"] == "mine" and version["threshold"] == 0.37 and version["active"] is False
    assert version["card"]["validation"] == {"ap": 0.91, "accuracy": 0.84}

    # A head of another width (the spec's shapes for this backbone) and a file that is no checkpoint.
    wide = build_head(head_dim("d3-tiny") * 2)
    save_head(wide, tmp_path / "wide.pth")
    refused = d3("models", "add", tmp_path / "wide.pth", code=1)
    assert "do not fit the model" in refused and "wrong shapes" in refused and "d3-tiny" in refused
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    assert "not a PyTorch checkpoint" in d3("models", "add", tmp_path / "junk.pth", code=1)
    # A card about another head is refused too, before anything is stored.
    other_card = tmp_path / "other.card.json"
    other_card.write_text(card.read_text().replace('"head_sha256": "', '"head_sha256": "00'))
    assert "belongs to head" in d3("models", "add", heads["b"], "--card", other_card, code=1)
    assert len(json.loads(d3("models", "list", "--json"))["versions"]) == 1
    objects = sorted(p.name for p in (tmp_path / "instance" / "objects" / "d3-models").rglob("*") if p.is_file())
    assert len(objects) == 2 and objects[1].endswith(".pth")  # a's head and card, nothing of the refused

    assert "active: " + version["version"] in d3("models", "activate", "mine")
    assert d3("models", "list").startswith("*  " + version["version"])
    assert "configured head" in d3("models", "activate", "--default")
    assert json.loads(d3("models", "list", "--json"))["active"] is None
    assert "no model version" in d3("models", "activate", "nosuch", code=1)
    d3("models", "activate", code=2)  # neither a version nor --default: a usage error


# -- HTTP -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["embedded", "postgres", "s3"])
def test_http_lists_adds_and_activates_for_admins_only(request, tmp_path, engine, heads, backend):
    overrides: dict[str, str] = {}
    if backend == "postgres":
        overrides["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    elif backend == "s3":
        s3 = request.getfixturevalue("s3_server")
        overrides.update(s3["settings"], BUCKET_MODELS=f"mdl-{s3['settings']['BUCKET_RESULTS'][4:]}")
    app = versioned_app(tmp_path, engine, **overrides)
    client = app.test_client()
    admin, user = admin_headers(app), user_headers(app)
    assert client.get("/models", headers=user).get_json() == {"active": None, "versions": []}

    card = write_card(heads["a"], threshold=0.25)
    assert upload_head(client, user, heads["a"], card).status_code == 403  # not an admin key
    assert upload_head(client, {}, heads["a"], card).status_code == 403  # anonymous (keys not required here)
    # The key is checked before the body is read: a bad body from a non-admin is a 403, not a 400.
    assert client.post("/models", data="not a form", headers=user).status_code == 403
    assert client.put("/models/active", data="{", content_type="application/json", headers=user).status_code == 403
    wide = tmp_path / "wide.pth"
    save_head(build_head(head_dim("d3-tiny") + 1), wide)
    bad = upload_head(client, admin, wide)
    assert bad.status_code == 400 and bad.get_json()["error"]["parameter"] == "head"
    assert "wrong shapes" in bad.get_json()["error"]["message"]
    assert stored_keys(app) == []  # nothing stored for refused heads

    added = upload_head(client, admin, heads["a"], card, name="first")
    assert added.status_code == 201, added.get_json()
    version = added.get_json()["version"]
    assert version.startswith("sha256:") and added.get_json()["threshold"] == 0.25
    again = upload_head(client, admin, heads["a"])
    assert again.status_code == 200 and again.get_json()["version"] == version  # same bytes, same version
    assert len(stored_keys(app)) == 2

    forbidden = activate(client, user, version=version)
    assert forbidden.status_code == 403 and forbidden.get_json()["error"]["code"] == "forbidden"
    assert activate(client, admin, version="nosuch").status_code == 404
    assert activate(client, admin, version=version, default=True).status_code == 400
    assert client.put("/models/active", data="x", headers=admin).status_code == 400  # not JSON
    done = activate(client, admin, version="first")
    assert done.status_code == 200, done.get_json()
    active = client.get("/models/active", headers=user).get_json()
    assert active["version"] == version and active["source"] == "model_versions"
    assert active["model_version"].split("/")[3] == f"head-{version}" and active["trained"] is False
    assert (active["threshold"], active["threshold_source"]) == (0.25, "card")
    assert active["database"]["version"] == version and active["database"]["activated_by"] == "ops"
    assert active["poll"]["poll_s"] == 0.2 and active["poll"]["poll_error"] is None
    assert time.time() - active["poll"]["polled_at"] < 5
    listing = client.get("/models", headers=user).get_json()
    assert listing["active"] == version and listing["versions"][0]["active"] is True
    assert listing["versions"][0]["card"]["validation"]["ap"] == 0.91

    back = activate(client, admin, default=True).get_json()
    assert back["version"] is None and back["source"] == "configured" and back["threshold_source"] == "settings"
    assert back["model_version"] == engine.heads.base.model_version


def test_the_card_threshold_is_the_default_and_a_request_threshold_wins(tmp_path, engine, heads,
                                                                        reference_model):
    app = versioned_app(tmp_path, engine)
    client, admin = app.test_client(), admin_headers(app)
    card = write_card(heads["b"], threshold=0.37)
    version = upload_head(client, admin, heads["b"], card).get_json()["version"]
    assert activate(client, admin, version=version).status_code == 200
    data = image_bytes(seed=5)
    [expected] = expected_scores(reference_model, heads["b"], [data])

    body = post_form(client, "/predict", [("file", ("x.png", data))]).get_json()
    assert body["threshold"] == 0.37 and body["model_version"].split("/")[3] == f"head-{version}"
    assert body["fake_probability"] == pytest.approx(expected, abs=1e-5)
    assert body["prediction"] == ("fake" if expected > 0.37 else "real")
    reused = post_form(client, "/predict", [("file", ("x.png", data))]).get_json()
    assert reused["reused"] is True and reused["id"] == body["id"]  # same bytes, threshold and version
    override = post_form(client, "/predict?threshold=0.9", [("file", ("x.png", data))]).get_json()
    assert override["threshold"] == 0.9 and override["reused"] is False

    activate(client, admin, default=True)
    configured = post_form(client, "/predict", [("file", ("x.png", data))]).get_json()
    assert configured["threshold"] == 0.5 and configured["reused"] is False  # another version: scored again
    assert configured["fake_probability"] == pytest.approx(expected_scores(reference_model, None, [data])[0],
                                                           abs=1e-5)


def test_activation_is_atomic_under_load(tmp_path, engine, heads, reference_model):
    """Many /predict and /predict/batch requests while the version flips: every answer is one head's
    score, the one its model_version names, and a batch never mixes heads."""
    app = versioned_app(tmp_path, engine)
    client, admin = app.test_client(), admin_headers(app)
    ids = {name: upload_head(client, admin, path).get_json()["version"] for name, path in heads.items()}
    images = [image_bytes(seed=20 + i, size=(40 + i, 32)) for i in range(6)]
    expected = {engine.heads.base.model_version: expected_scores(reference_model, None, images)}
    for name, path in heads.items():
        model_version = engine.heads.base.model_version.replace(
            engine.heads.base.model_version.split("/")[3], f"head-{ids[name]}")
        expected[model_version] = expected_scores(reference_model, path, images)
    assert min(abs(a - b) for a, b in zip(*list(expected.values())[1:], strict=True)) > 1e-3  # heads differ

    stop = threading.Event()
    switches = []

    def flip() -> None:
        order = [ids["a"], ids["b"], None]
        while not stop.is_set():
            target = order[len(switches) % 3]
            response = activate(client, admin, **({"version": target} if target else {"default": True}))
            assert response.status_code == 200
            switches.append(target)
            time.sleep(0.01)

    def one(i: int) -> list[tuple[str, int, float]]:
        if i % 2:
            picks = [(i + k) % len(images) for k in range(3)]
            response = post_form(client, "/predict/batch?reuse=false",
                                 [("files", (f"{p}.png", images[p])) for p in picks])
            assert response.status_code == 200, response.get_json()
            results = response.get_json()["results"]
            assert len({r["model_version"] for r in results}) == 1  # one head for the whole request
            return [(r["model_version"], p, r["fake_probability"]) for r, p in zip(results, picks, strict=True)]
        pick = i % len(images)
        response = post_form(client, "/predict?reuse=false", [("file", (f"{pick}.png", images[pick]))])
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        return [(body["model_version"], pick, body["fake_probability"])]

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = [a for chunk in pool.map(one, range(80)) for a in chunk]
    finally:
        stop.set()
        flipper.join(10)
    assert len(switches) >= 6
    seen = {model_version for model_version, _, _ in answers}
    assert len(seen) >= 2, seen  # the switch really happened under load
    for model_version, pick, probability in answers:
        assert probability == pytest.approx(expected[model_version][pick], abs=1e-5), model_version
    # The rows store the version that scored them, too.
    svc = app.extensions["d3"]
    from sqlalchemy import select

    from api.models import Prediction

    with svc.db.session() as session:
        rows = session.execute(select(Prediction.model_version, Prediction.fake_probability)).all()
    assert len(rows) == len(answers)
    assert {version for version, _ in rows} == seen


def test_a_second_engine_follows_the_activation_within_the_poll_interval(tmp_path, engine, heads, reference_model):
    app = versioned_app(tmp_path, engine)
    client, admin = app.test_client(), admin_headers(app)
    version = upload_head(client, admin, heads["a"], write_card(heads["a"], threshold=0.2)).get_json()["version"]
    # Another process's engine on the same database and store (here: the same services' catalog).
    other = InferenceEngine(DetectorConfig.from_settings(load_settings(TINY_MODEL)))
    other.attach_versions(app.extensions["d3"].model_versions, poll_s=0.2)
    other.start()
    try:
        assert other.wait_ready(60), other.load_error
        assert other.head().version is None
        app.extensions["d3"].model_versions.activate(version, by="test")  # what `d3 models activate` does
        started = time.monotonic()
        while other.head().version != version and time.monotonic() - started < 5:
            time.sleep(0.02)
        waited = time.monotonic() - started
        assert other.head().version == version, other.versions()
        assert waited < 1.5  # one poll (0.2 s) plus the head's load, not a restart
        data = image_bytes(seed=9)
        scored = other.score([preprocess_image(Image.open(io.BytesIO(data)))])
        assert scored.head.version == version and scored.head.threshold == 0.2
        assert other.model_version == scored.head.model_version  # describe() and /health say it too
        assert scored.probabilities[0] == pytest.approx(expected_scores(reference_model, heads["a"], [data])[0],
                                                        abs=1e-5)
    finally:
        other.stop()


def test_a_video_is_scored_by_the_head_pinned_when_it_came_in(tmp_path, engine, heads, reference_model):
    from tests.video_clips import clip_bytes

    app = versioned_app(tmp_path, engine)
    client, admin = app.test_client(), admin_headers(app)
    svc = app.extensions["d3"]
    ids = {name: upload_head(client, admin, path).get_json()["version"] for name, path in heads.items()}
    activate(client, admin, version=ids["a"])
    params = svc.videos.parse_params(None, frames=6)  # the request came in: head a pinned
    activate(client, admin, version=ids["b"])  # ... and b was activated before its frames were scored
    assert engine.head().version == ids["b"]
    path = tmp_path / "clip.avi"
    path.write_bytes(clip_bytes(tmp_path, levels=list(range(0, 250, 10))))
    from api.services.videos import SpooledUpload

    upload = SpooledUpload(str(path), path.stat().st_size, "0" * 64, "clip.avi")
    submission = svc.videos.submit(upload, params, None)
    body = submission.body
    assert not submission.queued and body["model_version"].split("/")[3] == f"head-{ids['a']}"
    frames = svc.videos.detail(svc.queries.get(body["id"], None, True))["frames"]
    assert len(frames) == 6
    # The same frames, decoded by the service's own decoder, scored outside it by head a and head b.
    with svc.videos.open_reader(str(path)) as reader:
        reader.probe()
        decoded = [Image.frombytes("RGB", (f.width, f.height), f.rgb)
                   for f in reader.frames([f["index"] for f in frames], 224)]
    pngs = []
    for image in decoded:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    by_a, by_b = (expected_scores(reference_model, heads[n], pngs) for n in ("a", "b"))
    assert [f["fake_probability"] for f in frames] == pytest.approx(by_a, abs=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(by_a, by_b, strict=True))
    later = svc.videos.submit(upload, svc.videos.parse_params(None, frames=6), None).body  # pinned now: b
    assert later["model_version"].split("/")[3] == f"head-{ids['b']}"
    later_frames = svc.videos.detail(svc.queries.get(later["id"], None, True))["frames"]
    assert [f["fake_probability"] for f in later_frames] == pytest.approx(by_b, abs=1e-5)

    # A job keeps the pinned version's id in its params and pins the same head when it runs, later,
    # in whichever process takes it: a's id (or the configured head, id None) while b is active.
    from api.services.videos import VideoParams

    stored = svc.videos.parse_params(None, frames=6)
    assert stored.as_dict()["model_version_id"] == ids["b"]
    configured = engine.heads.base.model_version.split("/")[3]
    for version, expected_head in ((ids["a"], f"head-{ids['a']}"), (None, configured)):
        job = VideoParams(threshold=0.5, frames=6, version=version, pinned=True)
        analysis = svc.videos.analyze_file(str(path), job)
        assert analysis.model_version.split("/")[3] == expected_head
    assert [f["fake_probability"] for f in sorted(analysis.frames, key=lambda f: f["index"])] == pytest.approx(
        expected_scores(reference_model, None, pngs), abs=1e-5)


def test_reconcile_keeps_the_heads_and_cards_of_versions(tmp_path, engine, heads):
    from api.services.reconcile import reconcile

    app = versioned_app(tmp_path, engine)
    svc = app.extensions["d3"]
    svc.model_versions.add(heads["a"].read_bytes(), json.loads(write_card(heads["a"]).read_text()))
    svc.store.put_bytes(svc.settings.bucket_models, "heads/stray.pth", b"x", "application/octet-stream")
    report = reconcile(svc.db, svc.store, svc.settings, grace_s=0)
    assert report.removed == [f"{svc.settings.bucket_models}/heads/stray.pth"]
    assert len(stored_keys(app)) == 2


def test_two_requests_adding_the_same_head_at_once_both_succeed_and_keep_its_files(tmp_path, engine, heads,
                                                                                 monkeypatch):
    """Both found no row, both wrote the (content-addressed) objects, one insert lost: the loser is a
    re-add, and its clean-up must not delete the files the winner's row points at."""
    from api.services import model_versions as module
    from api.services.reconcile import reconcile

    app = versioned_app(tmp_path, engine)
    svc = app.extensions["d3"]
    data, card = heads["a"].read_bytes(), json.loads(write_card(heads["a"]).read_text())
    original = module.insert_with_objects
    raced: list[bool] = []

    def other_request_first(*args, **kwargs):
        if not raced:  # the other request inserts between this one's check and its insert
            raced.append(True)
            assert svc.model_versions.add(data, card)[1] is True
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "insert_with_objects", other_request_first)
    body, created = svc.model_versions.add(data, card, name="mine")
    assert raced and created is False and body["name"] == "mine"
    assert len(stored_keys(app)) == 2  # the head and the card are still there
    client = app.test_client()
    assert activate(client, admin_headers(app), version="mine").status_code == 200
    assert reconcile(svc.db, svc.store, svc.settings, grace_s=0).rows_without_object == []


def test_adding_a_head_again_restores_its_file_when_the_store_lost_it(tmp_path, engine, heads):
    app = versioned_app(tmp_path, engine)
    svc = app.extensions["d3"]
    body, _ = svc.model_versions.add(heads["a"].read_bytes())
    head_key = f"heads/{body['sha256']}.pth"
    svc.store.delete(svc.settings.bucket_models, head_key)
    admin = admin_headers(app)
    client = app.test_client()
    assert activate(client, admin, version=body["version"]).status_code == 404  # "add it again"
    assert upload_head(client, admin, heads["a"]).status_code == 200
    assert svc.store.get_bytes(svc.settings.bucket_models, head_key) == heads["a"].read_bytes()
    assert activate(client, admin, version=body["version"]).status_code == 200


@pytest.mark.parametrize("section", ["validation", "calibration"])
@pytest.mark.parametrize("value", [[1], "text", 3])
def test_a_card_whose_sections_are_not_objects_is_refused_and_old_ones_still_list(tmp_path, engine, heads,
                                                                                 section, value):
    from api.models import ModelVersion

    app = versioned_app(tmp_path, engine)
    client, admin = app.test_client(), admin_headers(app)
    card = write_card(heads["a"], **{section: value})
    refused = upload_head(client, admin, heads["a"], card)
    assert refused.status_code == 400 and section in refused.get_json()["error"]["message"]
    assert stored_keys(app) == []
    # A card stored before this check (written straight into its row) lists without failing.
    assert upload_head(client, admin, heads["a"]).status_code == 201
    svc = app.extensions["d3"]
    with svc.db.session() as session:
        row = session.query(ModelVersion).one()
        row.card = {**json.loads(write_card(heads["a"]).read_text()), section: value}
    listing = client.get("/models", headers=admin)
    assert listing.status_code == 200, listing.get_data(as_text=True)[:300]
    assert listing.get_json()["versions"][0]["card"][section] is None


# -- the inference tier ---------------------------------------------------------------------------------
def test_an_activation_reaches_the_tier_and_the_api_records_the_tiers_version(tmp_path, heads, reference_model):
    import tritonclient.http as httpclient

    from api.database import upgrade_schema
    from tests.triton_tier import TritonTier

    instance = tmp_path / "instance"
    url = f"sqlite:///{instance / 'd3.sqlite'}"
    upgrade_schema(url)
    shared = {"INSTANCE_DIR": str(instance), "DATABASE_URL": url, "MODEL_VERSION_POLL_S": "0.2"}
    tier = TritonTier(TINY_MODEL, **shared)  # the API's database and (local) store, as on one host
    tier.start()
    app = None
    try:
        assert "model versions off" not in tier.output()
        app = make_app(tmp_path, None, D3_INFERENCE_URL=tier.grpc_url, **{**FAST, **shared})
        svc = app.extensions["d3"]
        assert svc.engine.wait_ready(30), svc.engine.load_error
        client, admin = app.test_client(), admin_headers(app)
        ids = {name: upload_head(client, admin, path, write_card(path, threshold=0.3)).get_json()["version"]
               for name, path in heads.items()}
        images = [image_bytes(seed=40 + i) for i in range(3)]
        expected = {name: expected_scores(reference_model, path, images) for name, path in heads.items()}
        expected["configured"] = expected_scores(reference_model, None, images)

        assert activate(client, admin, version=ids["a"]).status_code == 200
        body = post_form(client, "/predict", [("file", ("0.png", images[0]))]).get_json()
        assert body["model_version"].split("/")[3] == f"head-{ids['a']}", body
        assert body["fake_probability"] == pytest.approx(expected["a"][0], abs=1e-5)
        assert body["threshold"] == 0.3  # the card's, through the remote engine too

        # The tier itself follows the activation: a plain client that names no version gets b's head.
        assert activate(client, admin, version=ids["b"]).status_code == 200
        triton = httpclient.InferenceServerClient(tier.http_url.removeprefix("http://"))
        x = torch.stack([preprocess_image(Image.open(io.BytesIO(images[1])))]).numpy()
        request = httpclient.InferInput("images", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        started = time.monotonic()
        while True:
            response = triton.infer("d3", [request], outputs=[httpclient.InferRequestedOutput("fake_probability"),
                                                              httpclient.InferRequestedOutput("model_version")])
            version = response.as_numpy("model_version").reshape(-1)[0].decode()
            if f"head-{ids['b']}" in version or time.monotonic() - started > 5:
                break
            time.sleep(0.1)
        assert f"head-{ids['b']}" in version
        assert float(response.as_numpy("fake_probability").reshape(-1)[0]) == pytest.approx(expected["b"][1],
                                                                                              abs=1e-5)

        batch = post_form(client, "/predict/batch?reuse=false",
                          [("files", (f"{i}.png", data)) for i, data in enumerate(images)]).get_json()["results"]
        assert {r["model_version"].split("/")[3] for r in batch} == {f"head-{ids['b']}"}
        assert [r["fake_probability"] for r in batch] == pytest.approx(expected["b"], abs=1e-5)

        # A pinned request gets its head even while another is active (a video's chunks rely on it).
        pinned = svc.engine.score([preprocess_image(Image.open(io.BytesIO(images[2])))],
                                  head=svc.engine.head(ids["a"]))
        assert pinned.head.model_version.split("/")[3] == f"head-{ids['a']}"
        assert pinned.probabilities == pytest.approx([expected["a"][2]], abs=1e-5)

        assert activate(client, admin, default=True).status_code == 200
        back = post_form(client, "/predict?reuse=false", [("file", ("2.png", images[2]))]).get_json()
        assert back["model_version"] == svc.engine.model_version and back["threshold"] == 0.5
        assert back["fake_probability"] == pytest.approx(expected["configured"][2], abs=1e-5)
    finally:
        if app is not None:
            app.extensions["d3"].engine.stop()
        tier.destroy()
