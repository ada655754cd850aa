"""Access/portability export (Art. 15/20) on the real demo library, and the audit export.

One demo run is shared by the module. On top of it Joe Biden gets a consent and templates and the
two summit photos that show him beside Barack Obama are rescanned, so the export of Obama has to
leave out a co-depicted person who *is* identified (and whose id stands in the same audit
entries). A human decision is added as well: one of Obama's faces confirmed, a stranger's face
rejected as Obama.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import shutil
import sqlite3
import uuid
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest
from rich.console import Console
from typer.testing import CliRunner

import plugin.cli_records  # noqa: F401  (registers the commands)
from plugin import keys, people
from plugin.app import App
from plugin.cli import app, scan_app
from plugin.demo import consent_for
from plugin.export import AUDIT_FIELDS, SCHEMA_FILE
from plugin.models import FaceRecord, FaceState, Subject
from tests.demo_run import scanned_demo

runner = CliRunner()
SUMMIT = ("events/2024-summit/IMG_2041.jpg", "events/2024-summit/IMG_2042.jpg")


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, demo_data, engine, monkeypatch_module):
    monkeypatch_module.delenv("CONSENTRY_KEY", raising=False)
    out = scanned_demo(tmp_path_factory.mktemp("export") / "consentry-demo", demo_data, engine,
                       monkeypatch_module)
    with App.open(out / "consentry.toml") as a:
        biden = a.state.resolve_subject("Joe Biden")
        now = a.pipeline.clock()
        people.add_consent(a.state, a.audit, consent_for(
            "full", biden, now, out / "quitclaims" / "Joe_Biden.txt"))
        people.enroll(a.state, a.vault, a.audit, a.engine, biden,
                      [demo_data / f"people/Joe_Biden/ref-{i}.jpg" for i in (1, 2)], now=now,
                      decode_options=a.pipeline.decode_options)
        scan_app(a, paths=[out / "library" / p for p in SUMMIT],
                 out=Console(file=io.StringIO()))
        obama = a.state.resolve_subject("Barack Obama")
        # Human decisions: Obama's portrait confirmed; the stranger in IMG_2042 rejected as him.
        portrait = a.state.faces("photos", "portraits/IMG_3301.jpg")
        assert [f.subject_id for f in portrait] == [obama.id]
        summit = a.state.faces("photos", SUMMIT[1])
        stranger = [i for i, f in enumerate(summit) if f.subject_id is None]
        assert len(stranger) == 1
        summit[stranger[0]] = FaceRecord(box=summit[stranger[0]].box, state=FaceState.REJECTED,
                                         subject_id=obama.id)
        with a.state.begin() as conn:
            a.state.set_faces_state("photos", "portraits/IMG_3301.jpg", [portrait[0].model_copy(
                update={"state": FaceState.CONFIRMED})], conn=conn)
            a.state.set_faces_state("photos", SUMMIT[1], summit, conn=conn)
    return out


@pytest.fixture(scope="module")
def exported(demo_out, tmp_path_factory):
    """Obama's export through the CLI, on a copy (the export appends an audit entry)."""
    copy = tmp_path_factory.mktemp("export-copy") / "demo"
    shutil.copytree(demo_out, copy)
    out = copy / "exports"
    result = runner.invoke(app, ["--config", str(copy / "consentry.toml"), "subjects", "export",
                                 "Barack Obama", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with App.open(copy / "consentry.toml") as a:
        obama = a.state.resolve_subject("Barack Obama")
    return {"root": copy, "out": out, "id": str(obama.id),
            "json": out / f"{obama.id}.json", "html": out / f"{obama.id}.html"}


def db_rows(root: Path, sql: str, *args) -> list[tuple]:
    db = sqlite3.connect(root / ".consentry" / "state.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


# -- schema validation -------------------------------------------------------------------
class StrictSchemaChecker:
    """The subset of JSON Schema 2020-12 the published schema uses, failing on any keyword it
    does not know (so the schema cannot silently rely on something unchecked). Used only
    when the `jsonschema` library is not installed."""

    ANNOTATIONS: ClassVar[set[str]] = {"$schema", "$id", "title", "description", "$comment",
                                       "$defs", "format"}
    TYPES: ClassVar[dict[str, type]] = {"object": dict, "array": list, "string": str,
                                        "boolean": bool, "null": type(None)}

    def __init__(self, root: dict) -> None:
        self.root = root

    def check(self, value, schema: dict, path: str = "$") -> None:
        for key in schema:
            assert key in self.ANNOTATIONS | {
                "$ref", "type", "const", "enum", "properties", "required", "additionalProperties",
                "items", "minItems", "pattern", "minLength", "minimum", "maximum", "anyOf",
            }, f"schema keyword {key!r} at {path} is not supported by the checker"
        if "$ref" in schema:
            ref = schema["$ref"]
            assert ref.startswith("#/$defs/"), ref
            self.check(value, self.root["$defs"][ref.removeprefix("#/$defs/")], path)
        if "anyOf" in schema:
            errors = []
            for option in schema["anyOf"]:
                try:
                    self.check(value, option, path)
                    break
                except AssertionError as err:
                    errors.append(str(err))
            else:
                raise AssertionError(f"{path}: matches no anyOf option: {errors}")
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            assert any(self._is(value, t) for t in types), f"{path}: {value!r} is not {types}"
        if "const" in schema:
            assert value == schema["const"] and type(value) is type(schema["const"]), path
        if "enum" in schema:
            assert any(value == e and type(value) is type(e) for e in schema["enum"]), (
                f"{path}: {value!r} not in {schema['enum']}")
        if isinstance(value, str):
            if "pattern" in schema:
                assert re.search(schema["pattern"], value), f"{path}: {value!r} !~ pattern"
            if "minLength" in schema:
                assert len(value) >= schema["minLength"], path
            if schema.get("format") == "date-time":
                datetime.fromisoformat(value.replace("Z", "+00:00"))
        if self._is(value, "number"):
            if "minimum" in schema:
                assert value >= schema["minimum"], path
            if "maximum" in schema:
                assert value <= schema["maximum"], path
        if isinstance(value, dict):
            props = schema.get("properties", {})
            for name in schema.get("required", []):
                assert name in value, f"{path}: {name!r} is required"
            for name, item in value.items():
                if name in props:
                    self.check(item, props[name], f"{path}.{name}")
                elif schema.get("additionalProperties") is False:
                    raise AssertionError(f"{path}: unexpected property {name!r}")
                elif isinstance(schema.get("additionalProperties"), dict):
                    self.check(item, schema["additionalProperties"], f"{path}.{name}")
        if isinstance(value, list):
            assert len(value) >= schema.get("minItems", 0), f"{path}: too few items"
            if "items" in schema:
                for i, item in enumerate(value):
                    self.check(item, schema["items"], f"{path}[{i}]")

    @classmethod
    def _is(cls, value, name: str) -> bool:
        if name == "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        if name == "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
        return isinstance(value, cls.TYPES[name])


def invalid_errors() -> tuple[type[Exception], ...]:
    try:
        import jsonschema
    except ImportError:
        return (AssertionError,)
    return (jsonschema.ValidationError,)


def validate(document: dict) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    try:
        import jsonschema
    except ImportError:
        StrictSchemaChecker(schema).check(document, schema)
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(document)


def test_export_validates_against_the_published_schema(exported):
    document = json.loads(exported["json"].read_text(encoding="utf-8"))
    validate(document)
    # The check has teeth: an extra field or a wrong state is refused.
    for broken in (
        {**document, "extra": 1},
        {**document, "assets": [{**document["assets"][0], "faces": [
            {**document["assets"][0]["faces"][0], "state": "unknown"}]}]},
        {**document, "subject": {**document["subject"], "id": "not-a-uuid"}},
    ):
        with pytest.raises(invalid_errors()):
            validate(broken)


# -- content -----------------------------------------------------------------------------
def test_export_lists_exactly_the_assets_where_the_person_was_identified(exported, manifest):
    document = json.loads(exported["json"].read_text(encoding="utf-8"))
    sid = exported["id"]
    truth = db_rows(exported["root"], "select asset_id, top, right, bottom, left, state "
                    "from faces where subject_id = ? and state in ('auto', 'confirmed') "
                    "order by asset_id, idx", sid)
    listed = [(a["asset_id"], f["box"]["top"], f["box"]["right"], f["box"]["bottom"],
               f["box"]["left"], f["state"]) for a in document["assets"] for f in a["faces"]]
    assert listed == truth
    assert {a["asset_id"] for a in document["assets"]} >= {*SUMMIT, "portraits/IMG_3301.jpg"}
    # Each listed face is Obama's in the data's own ground truth (no wrong attribution).
    photos = {p["path"].removeprefix("library/"): p for p in manifest["photos"]}
    for a in document["assets"]:
        for f in a["faces"]:
            b = f["box"]
            best = max(photos[a["asset_id"]]["faces"], key=lambda t: overlap(t["box"], b))
            assert overlap(best["box"], b) >= 0.4 and best["person"] == "Barack_Obama"
    by_id = {a["asset_id"]: a for a in document["assets"]}
    # Two identified people in IMG_2041/2042: only Obama's face is listed; the face rejected
    # as Obama is not; the confirmed portrait is, as confirmed.
    assert all(len(by_id[p]["faces"]) == 1 for p in SUMMIT)
    assert by_id["portraits/IMG_3301.jpg"]["faces"][0]["state"] == "confirmed"
    statuses = dict(db_rows(exported["root"], "select asset_id, status from assets"))
    assert all(a["status"] == statuses[a["asset_id"]] for a in document["assets"])
    assert document["subject"]["display_name"] == "Barack Obama"
    [consent] = document["consents"]
    assert {g["kind"] for g in consent["grants"]} == {"biometric", "publication"}
    assert all(g["state"] == "active" for g in consent["grants"])
    assert document["biometric_templates"]["count"] == 2


def overlap(a, b) -> float:
    t, r, btm, lft = a
    t2, r2, b2, l2 = b["top"], b["right"], b["bottom"], b["left"]
    ih, iw = max(0, min(btm, b2) - max(t, t2)), max(0, min(r, r2) - max(lft, l2))
    union = (btm - t) * (r - lft) + (b2 - t2) * (r2 - l2) - ih * iw
    return ih * iw / union if union else 0.0


def test_export_holds_no_other_persons_data(exported):
    root, sid = exported["root"], exported["id"]
    others = db_rows(root, "select id, display_name from subjects where id != ?", sid)
    assert {name for _, name in others} >= {"Joe Biden", "George Clooney"}
    biden = next(i for i, name in others if name == "Joe Biden")
    # Precondition: the co-depicted Biden was identified, and the audit entries of the summit
    # photos carry his id and consent next to Obama's: the export had something to remove.
    assert {r[0] for r in db_rows(root, "select asset_id from faces where subject_id = ?",
                                  biden)} >= set(SUMMIT)
    mixed = [seq for seq, details in db_rows(root, "select seq, details from audit")
             if sid in details and biden in details]
    assert mixed
    foreign = {i for i, _ in others}
    foreign |= {r[0] for r in db_rows(root, "select id from consents where subject_id != ?", sid)}
    foreign |= {r[0] for r in db_rows(
        root, "select g.id from grants g join consents c on c.id = g.consent_id "
        "where c.subject_id != ?", sid)}
    words = {w for _, name in others for w in name.split() if len(w) > 3}
    for path in (exported["json"], exported["html"]):
        text = path.read_text(encoding="utf-8")
        leaked = [x for x in foreign if x in text] + [w for w in words if w in text]
        assert not leaked, f"{path.name} holds other people's data: {leaked}"
    document = json.loads(exported["json"].read_text(encoding="utf-8"))
    history = {h["seq"]: h for h in document["processing_history"]}
    assert set(mixed) <= set(history)
    for seq in mixed:
        assert history[seq]["details"]["identified"] == [sid]


def test_processing_history_is_the_audit_entries_about_the_person(exported):
    root, sid = exported["root"], exported["id"]
    document = json.loads(exported["json"].read_text(encoding="utf-8"))
    expected = [seq for seq, subject, details in db_rows(
        root, "select seq, subject_id, details from audit order by seq")
        if subject == sid or (subject is None and sid in details)]
    got = [h["seq"] for h in document["processing_history"]]
    assert got == [s for s in expected if s < max(expected)]  # all but the export's own entry
    actions = {h["action"] for h in document["processing_history"]}
    assert {"subject.added", "consent.added", "subject.enrolled", "asset.analysed"} <= actions
    # The disclosure itself is recorded, by id.
    last = db_rows(root, "select action, subject_id, details from audit order by seq desc")[0]
    assert last[:2] == ("subject.exported", sid)
    assert json.loads(last[2])["assets"] == len(document["assets"])


def test_files_are_private_and_named_by_subject_id(exported):
    for path in (exported["json"], exported["html"]):
        assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in exported["out"].iterdir()) == [
        f"{exported['id']}.html", f"{exported['id']}.json"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_summary_escapes_text_and_loads_nothing(demo_out, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_out, copy)
    hostile = 'Ann <script>alert("x")</script> & <img src=http://evil.example/t.gif>'
    with App.open(copy / "consentry.toml") as a:
        subject = people.add_subject(a.state, a.audit, Subject(display_name=hostile))
        consent = consent_for("limited", subject, a.pipeline.clock(), copy / "doc.txt")
        people.add_consent(a.state, a.audit, consent.model_copy(
            update={"document_ref": "https://dms.example/<b>q</b>.pdf"}))
    result = runner.invoke(app, ["--config", str(copy / "consentry.toml"), "subjects",
                                 "export", str(subject.id), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "x" / f"{subject.id}.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    allowed = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code",
               "table", "thead", "tbody", "tr", "th", "td"}
    assert {tag for tag, _ in parser.tags} <= allowed
    assert not [a for _, attrs in parser.tags for a in attrs if a in ("src", "href", "action")]
    assert "url(" not in page and "@import" not in page
    assert "default-src 'none'" in page
    text = "".join(parser.text)
    assert hostile in text and "https://dms.example/<b>q</b>.pdf" in text
    document = json.loads((tmp_path / "x" / f"{subject.id}.json").read_text(encoding="utf-8"))
    assert document["subject"]["display_name"] == hostile and document["assets"] == []
    validate(document)


def test_unknown_subject_is_refused(demo_out, tmp_path):
    result = runner.invoke(app, ["--config", str(demo_out / "consentry.toml"), "subjects",
                                 "export", "Nobody Here", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no such subject" in result.output
    assert not (tmp_path / "x").exists()


# -- audit export ------------------------------------------------------------------------
@pytest.fixture
def audit_setup(tmp_path, monkeypatch):
    """A fresh installation whose audit log holds entries at known times."""
    from plugin.setup import initialise

    monkeypatch.delenv("CONSENTRY_KEY", raising=False)
    config = tmp_path / "consentry.toml"
    initialise(config)
    subject = uuid.uuid4()
    times = ["2024-01-01T08:00:00+00:00", "2024-06-01T09:00:00+00:00",
             "2024-06-01T11:00:00+00:00", "2025-01-01T00:00:00+00:00"]
    with App.open(config) as a:
        for i, when in enumerate(times):
            a.audit.append("test.event", actor="admin", subject_id=subject,
                           asset=f"photos:{i}.jpg", details={"n": i, "note": "é"},
                           at=datetime.fromisoformat(when))
        key_file = a.settings.key_file
    return config, keys.derive_key(keys.load_kek(key_file=key_file, env={}), "audit")


def reverify(lines: list[dict], key: bytes) -> None:
    """Independent check of exported lines: each MAC, and each link to the line before."""
    for i, entry in enumerate(lines):
        payload = {k: entry[k] for k in AUDIT_FIELDS if k != "mac"}
        payload["details"] = json.dumps(entry["details"], sort_keys=True, separators=(",", ":"),
                                        ensure_ascii=False)
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        mac = hmac.new(key, b"consentry audit entry v1\n" + body.encode(), hashlib.sha256)
        assert hmac.compare_digest(mac.hexdigest(), entry["mac"]), f"seq {entry['seq']}: MAC"
        if i:
            assert entry["prev_mac"] == lines[i - 1]["mac"], f"seq {entry['seq']}: link"
            assert entry["seq"] == lines[i - 1]["seq"] + 1


def test_audit_export_since_date_reverifies_with_the_key(audit_setup, tmp_path):
    config, key = audit_setup
    out = tmp_path / "audit.jsonl"
    result = runner.invoke(app, ["--config", str(config), "audit", "export",
                                 "--since", "2024-06-01", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 audit entries" in result.output
    assert out.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [list(e) for e in lines] == [list(AUDIT_FIELDS)] * 3
    expected = db_rows(config.parent, "select seq from audit where at >= ? order by seq",
                       "2024-06-01T00:00:00.000000+00:00")
    assert [e["seq"] for e in lines] == [s for (s,) in expected] == [2, 3, 4]
    assert lines[0]["details"] == {"n": 1, "note": "é"}
    reverify(lines, key)
    # The first line links to the entry before the window, as the full export shows.
    full = runner.invoke(app, ["--config", str(config), "audit", "export"])
    everything = [json.loads(line) for line in full.output.splitlines()]
    assert len(everything) == 4 and everything[0]["prev_mac"] == "0" * 64
    assert lines[0]["prev_mac"] == everything[0]["mac"]
    reverify(everything, key)
    # Tampering is caught by the same check.
    forged = [dict(e) for e in lines]
    forged[1]["details"] = {"n": 99, "note": "é"}
    with pytest.raises(AssertionError, match="MAC"):
        reverify(forged, key)
    with pytest.raises(AssertionError, match="link"):
        reverify([lines[0], lines[2]], key)


def test_audit_export_since_iso_time_to_stdout(audit_setup):
    config, key = audit_setup
    result = runner.invoke(app, ["--config", str(config), "audit", "export",
                                 "--since", "2024-06-01T12:00:00+02:00"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [e["at"] for e in lines] == ["2024-06-01T11:00:00.000000+00:00",
                                        "2025-01-01T00:00:00.000000+00:00"]
    reverify(lines, key)
    assert datetime.fromisoformat(lines[0]["at"]) >= datetime(2024, 6, 1, 10, tzinfo=UTC)
    bad = runner.invoke(app, ["--config", str(config), "audit", "export", "--since", "June"])
    assert bad.exit_code == 2 and "--since" in bad.output

