"""XMP written through the real exiftool, read back by the exiftool program itself.

Photos are real JPEGs: the demo photo IMG_2041.jpg (1126x661, two faces) where face positions
matter, JPEGs made with Pillow elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from plugin.errors import MetadataError
from plugin.models import (
    AssetVerdict,
    FaceBox,
    FaceVerdict,
    Geometry,
    ModelRelease,
    Status,
)
from plugin.xmp import DEFAULT_CONFIG, XmpWriter

SUMMIT = "demo/library/events/2024-summit/IMG_2041.jpg"
GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("CONSENTRY_UPDATE_GOLDEN") == "1"
OBAMA = uuid.UUID("00000000-0000-4000-8000-000000000001")
BIDEN = uuid.UUID("00000000-0000-4000-8000-000000000002")
CONSENT = uuid.UUID("00000000-0000-4000-8000-0000000000c1")
UNTIL = datetime(2027, 5, 1, 12, 30, tzinfo=UTC)
OBAMA_BOX = FaceBox(top=44, right=396, bottom=213, left=226)
BIDEN_BOX = FaceBox(top=88, right=933, bottom=230, left=792)
SUMMIT_GEOMETRY = Geometry(stored_width=1126, stored_height=661)
PLAIN_GEOMETRY = Geometry(stored_width=320, stored_height=240)

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")


# -- helpers --------------------------------------------------------------------------------
def exiftool_json(path: Path, *args: str) -> dict[str, Any]:
    """What the exiftool program reports, independent of our reader."""
    out = subprocess.run(
        ["exiftool", "-config", str(DEFAULT_CONFIG), "-j", "-struct", "-G1", *args, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)[0]


def raw_xmp(path: Path) -> str:
    return subprocess.run(
        ["exiftool", "-b", "-XMP", str(path)], capture_output=True, text=True, check=True
    ).stdout


def exiftool_set(path: Path, *assignments: str) -> None:
    subprocess.run(
        [
            "exiftool",
            "-config",
            str(DEFAULT_CONFIG),
            "-q",
            "-overwrite_original",
            *assignments,
            path,
        ],
        check=True,
        capture_output=True,
    )


def regions(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["XMP-mwg-rs:RegionInfo"].get("RegionList", [])


def face(
    box: FaceBox,
    status: Status = Status.MISSING,
    *,
    name: str | None = None,
    subject: uuid.UUID | None = None,
) -> FaceVerdict:
    return FaceVerdict(box=box, status=status, name=name, subject_id=subject)


def verdict(*faces: FaceVerdict, status: Status = Status.MISSING, **fields: Any) -> AssetVerdict:
    release = ModelRelease.NONE if faces else ModelRelease.NOT_APPLICABLE
    fields.setdefault("model_release", release)
    return AssetVerdict(status=status if faces else Status.NO_FACES, faces=faces, **fields)


def summit_verdict(*, named: bool = True, status: Status = Status.LIMITED) -> AssetVerdict:
    """Obama identified (named while `named`), Biden an unknown face."""
    return verdict(
        face(
            OBAMA_BOX,
            Status.LIMITED,
            name="Barack Obama" if named else None,
            subject=OBAMA if named else None,
        ),
        face(BIDEN_BOX),
        status=status,
        model_release=ModelRelease.LIMITED,
        channels=("internal", "intranet"),
        valid_until=UNTIL,
        consent_ids=(CONSENT,),
        unidentified=1,
    )


def stored_from_upright(image: Image.Image, orientation: int) -> Image.Image:
    """The stored pixels Pillow shows as `image` under `orientation`: an orientation is a
    symmetry of the rectangle, so applying Pillow's exif_transpose three times undoes it."""
    out = image
    for _ in range(3):
        tagged = out.copy()
        tagged.getexif()[0x0112] = orientation
        out = ImageOps.exif_transpose(tagged)
    return out


def mask(size: tuple[int, int], box: FaceBox) -> Image.Image:
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle((box.left, box.top, box.right - 1, box.bottom - 1), fill=255)
    return image


def leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if "consentry" in p.name or "_original" in p.name
    )


def age(path: Path, seconds: int = 3600) -> int:
    """Push the mtime into the past, so that any rewrite would show."""
    past = int(path.stat().st_mtime) - seconds
    os.utime(path, (past, past))
    return path.stat().st_mtime_ns


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def writer():
    with XmpWriter() as w:
        yield w


@pytest.fixture(scope="module")
def keyword_writer():
    with XmpWriter(names_as_keywords=True) as w:
        yield w


@pytest.fixture
def summit(testdata: Path, tmp_path: Path) -> Path:
    path = tmp_path / "IMG_2041.jpg"
    shutil.copyfile(testdata / SUMMIT, path)
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A real JPEG from Pillow, 320 x 240, with no metadata."""
    image = Image.new("RGB", (320, 240), (90, 120, 150))
    ImageDraw.Draw(image).ellipse((40, 30, 140, 150), fill=(220, 180, 150))
    path = tmp_path / "plain.jpg"
    image.save(path, quality=90)
    return path


def add_foreign(path: Path) -> None:
    """Metadata another tool wrote: a named region, a pet, people, keywords, a caption."""
    exiftool_set(
        path,
        "-XMP-mwg-rs:RegionInfo={AppliedToDimensions={W=320,H=240,Unit=pixel},RegionList=["
        "{Area={X=0.50,Y=0.5,W=0.1,H=0.1,Unit=normalized},Name=Somebody Else,Type=Face},"
        "{Area={X=0.2,Y=0.8,W=0.2,H=0.15,Unit=normalized},Type=Pet,Description=the dog}]}",
        "-XMP-iptcExt:PersonInImage=Somebody Else",
        "-XMP-iptcExt:PersonInImageWDetails={PersonName=Somebody Else,"
        "PersonId=https://www.wikidata.org/wiki/Q42}",
        "-XMP-plus:ModelReleaseID=AGENCY-7",
        "-XMP-lr:HierarchicalSubject=Places|Berlin",
        "-XMP-digiKam:TagsList=Places/Berlin",
        "-XMP-dc:Subject=Berlin",
        "-XMP-dc:Description=President Obama and Vice President Biden",
    )


def assert_foreign_intact(doc: dict[str, Any]) -> None:
    foreign = [r for r in regions(doc) if r.get("Name") == "Somebody Else" or r["Type"] == "Pet"]
    assert len(foreign) == 2
    assert foreign[1]["Description"] == "the dog"
    assert doc["XMP-iptcExt:PersonInImage"].count("Somebody Else") == 1
    assert {
        "PersonName": "Somebody Else",
        "PersonId": ["https://www.wikidata.org/wiki/Q42"],
    } in doc["XMP-iptcExt:PersonInImageWDetails"]
    assert "AGENCY-7" in doc["XMP-plus:ModelReleaseID"]
    assert doc["XMP-lr:HierarchicalSubject"].count("Places|Berlin") == 1
    assert doc["XMP-digiKam:TagsList"].count("Places/Berlin") == 1
    assert doc["XMP-dc:Subject"] == ["Berlin"]
    assert doc["XMP-dc:Description"] == "President Obama and Vice President Biden"


# -- what is written ------------------------------------------------------------------------
def test_fields_read_back_by_exiftool_agree_with_the_verdict(writer: XmpWriter, summit: Path):
    assert writer.write(summit, summit_verdict(), SUMMIT_GEOMETRY, engine="dlib-hog/20.0")
    doc = exiftool_json(summit, "-XMP:all")

    info = doc["XMP-mwg-rs:RegionInfo"]
    assert info["AppliedToDimensions"] == {"W": 1126, "H": 661, "Unit": "pixel"}
    obama, biden = regions(doc)
    assert obama["Name"] == "Barack Obama" and obama["Type"] == "Face"
    assert "Name" not in biden and biden["Type"] == "Face"
    assert obama["Area"] == {
        "X": pytest.approx((226 + 396) / 2 / 1126, abs=1e-6),
        "Y": pytest.approx((44 + 213) / 2 / 661, abs=1e-6),
        "W": pytest.approx(170 / 1126, abs=1e-6),
        "H": pytest.approx(169 / 661, abs=1e-6),
        "Unit": "normalized",
    }
    assert doc["XMP-iptcExt:PersonInImage"] == ["Barack Obama"]
    assert doc["XMP-iptcExt:PersonInImageWDetails"] == [
        {"PersonName": "Barack Obama", "PersonId": [f"urn:uuid:{OBAMA}"]}
    ]
    assert doc["XMP-plus:ModelReleaseStatus"] == "Limited or Incomplete Model Releases"
    code = exiftool_json(summit, "-XMP-plus:ModelReleaseStatus#")
    assert code["XMP-plus:ModelReleaseStatus"] == "MR-LMR"
    assert doc["XMP-plus:ModelReleaseID"] == [str(CONSENT)]
    assert "XMP-plus:MinorModelAgeDisclosure" not in doc
    assert doc["XMP-lr:HierarchicalSubject"] == ["Consent|Limited"]
    assert doc["XMP-digiKam:TagsList"] == ["Consent/Limited"]
    assert doc["XMP-consentry:Status"] == "limited"
    assert doc["XMP-consentry:Channels"] == ["internal", "intranet"]
    assert doc["XMP-consentry:ConsentIDs"] == [str(CONSENT)]
    assert doc["XMP-consentry:Unidentified"] == 1
    assert doc["XMP-consentry:Engine"] == "dlib-hog/20.0"
    assert len(doc["XMP-consentry:Regions"]) == 2
    assert "NameKeywords" not in json.dumps(doc)
    packet = raw_xmp(summit)
    assert "<plus:ModelReleaseStatus>http://ns.useplus.org/ldf/vocab/MR-LMR<" in packet
    assert "<consentry:ValidUntil>2027-05-01T12:30:00Z</consentry:ValidUntil>" in packet
    assert "xmlns:consentry='http://ns.consentry.org/xmp/1.0/'" in packet

    state = writer.read(summit)
    assert [r.name for r in state.regions] == ["Barack Obama", None]
    assert all(r.ours for r in state.regions) and state.foreign_names == ()
    assert state.status is Status.LIMITED and state.model_release is ModelRelease.LIMITED
    assert state.valid_until == UNTIL and state.unidentified == 1
    assert state.person_details[0].ids == (f"urn:uuid:{OBAMA}",)


@pytest.mark.parametrize("release", list(ModelRelease))
def test_model_release_status_is_stored_as_the_plus_uri(
    writer: XmpWriter, photo: Path, release: ModelRelease
):
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    faces = () if release is ModelRelease.NOT_APPLICABLE else (face(box),)
    writer.write(photo, verdict(*faces, model_release=release), PLAIN_GEOMETRY, engine="e")
    assert exiftool_json(photo, "-n", "-XMP-plus:ModelReleaseStatus")[
        "XMP-plus:ModelReleaseStatus"
    ] == str(release)
    assert f"http://ns.useplus.org/ldf/vocab/{release}<" in raw_xmp(photo)
    assert writer.read(photo).model_release is release


def test_an_unnamed_face_gets_a_region_without_name_and_no_person(writer: XmpWriter, photo: Path):
    writer.write(
        photo,
        verdict(face(FaceBox(top=30, right=140, bottom=150, left=40))),
        PLAIN_GEOMETRY,
        engine="e",
    )
    doc = exiftool_json(photo, "-XMP:all")
    [region] = regions(doc)
    assert region["Type"] == "Face" and "Name" not in region
    assert "XMP-iptcExt:PersonInImage" not in doc
    assert "XMP-iptcExt:PersonInImageWDetails" not in doc
    assert doc["XMP-lr:HierarchicalSubject"] == ["Consent|Missing"]
    assert writer.read(photo).regions[0].name is None


def test_no_faces_keeps_applied_to_dimensions(writer: XmpWriter, photo: Path):
    writer.write(photo, verdict(), PLAIN_GEOMETRY, engine="e")
    doc = exiftool_json(photo, "-XMP:all")
    assert doc["XMP-mwg-rs:RegionInfo"] == {
        "AppliedToDimensions": {"W": 320, "H": 240, "Unit": "pixel"}
    }
    assert doc["XMP-digiKam:TagsList"] == ["Consent/No faces"]
    assert doc["XMP-consentry:Status"] == "no_faces"


def test_a_minor_is_disclosed_and_the_disclosure_withdrawn(writer: XmpWriter, photo: Path):
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    writer.write(photo, verdict(face(box), minor=True), PLAIN_GEOMETRY, engine="e")
    read = exiftool_json(photo, "-XMP-plus:MinorModelAgeDisclosure#")
    assert read["XMP-plus:MinorModelAgeDisclosure"] == "AG-UNK"
    writer.write(photo, verdict(face(box)), PLAIN_GEOMETRY, engine="e")
    assert "XMP-plus:MinorModelAgeDisclosure" not in exiftool_json(photo, "-XMP-plus:all")
    # A precise age someone else recorded is better than ours and stays.
    exiftool_set(photo, "-XMP-plus:MinorModelAgeDisclosure#=AG-A16")
    writer.write(photo, verdict(face(box), minor=True), PLAIN_GEOMETRY, engine="e")
    assert writer.read(photo).minor_age == "AG-A16"


def test_non_ascii_names_round_trip(writer: XmpWriter, photo: Path):
    names = ("Zoë Ñandú", "李雷")
    faces = (
        face(FaceBox(top=20, right=100, bottom=100, left=20), name=names[0], subject=OBAMA),
        face(FaceBox(top=120, right=300, bottom=220, left=200), name=names[1], subject=BIDEN),
    )
    assert writer.write(photo, verdict(*faces), PLAIN_GEOMETRY, engine="e")
    doc = exiftool_json(photo, "-XMP:all")
    assert [r["Name"] for r in regions(doc)] == list(names)
    assert doc["XMP-iptcExt:PersonInImage"] == list(names)
    assert [d["PersonName"] for d in doc["XMP-iptcExt:PersonInImageWDetails"]] == list(names)
    assert writer.read(photo).persons == names
    assert not writer.write(photo, verdict(*faces), PLAIN_GEOMETRY, engine="e")


def test_golden(writer: XmpWriter, photo: Path):
    """What we write, as exiftool reports it (CONSENTRY_UPDATE_GOLDEN=1 rewrites the file)."""
    faces = (
        face(
            FaceBox(top=30, right=140, bottom=150, left=40),
            Status.CLEARED,
            name="Jane Doe",
            subject=OBAMA,
        ),
        face(FaceBox(top=100, right=300, bottom=200, left=220)),
    )
    asset = verdict(
        *faces,
        status=Status.MISSING,
        model_release=ModelRelease.LIMITED,
        channels=("internal",),
        valid_until=UNTIL,
        consent_ids=(CONSENT,),
        unidentified=1,
        minor=True,
    )
    writer.write(photo, asset, PLAIN_GEOMETRY, engine="dlib-hog/20.0")
    doc = exiftool_json(photo, "-n", "-XMP:all")
    doc = {k: v for k, v in doc.items() if k not in ("SourceFile", "XMP-x:XMPToolkit")}
    golden = GOLDEN / "xmp_basic.json"
    if UPDATE_GOLDEN:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert doc == json.loads(golden.read_text(encoding="utf-8"))


# -- idempotence and what others wrote ------------------------------------------------------
def test_the_same_verdict_twice_leaves_the_file_byte_identical(writer: XmpWriter, summit: Path):
    assert writer.write(summit, summit_verdict(), SUMMIT_GEOMETRY, engine="e")
    before, mtime = summit.read_bytes(), age(summit)
    assert not writer.write(summit, summit_verdict(), SUMMIT_GEOMETRY, engine="e")
    with XmpWriter() as fresh:  # a new exiftool process changes nothing either
        assert not fresh.write(summit, summit_verdict(), SUMMIT_GEOMETRY, engine="e")
    assert summit.read_bytes() == before
    assert summit.stat().st_mtime_ns == mtime
    assert leftovers(summit.parent) == []


def test_foreign_metadata_survives_two_writes(writer: XmpWriter, photo: Path):
    add_foreign(photo)
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    first = verdict(
        face(box, Status.CLEARED, name="Jane Doe", subject=OBAMA), status=Status.CLEARED
    )
    second = verdict(
        face(box, Status.CLEARED, name="Jane Doe", subject=OBAMA), status=Status.REVIEW
    )
    assert writer.write(photo, first, PLAIN_GEOMETRY, engine="e")
    assert writer.write(photo, second, PLAIN_GEOMETRY, engine="e")
    assert not writer.write(photo, second, PLAIN_GEOMETRY, engine="e")
    doc = exiftool_json(photo, "-XMP:all")
    assert_foreign_intact(doc)
    assert "<stArea:x>0.50</stArea:x>" in raw_xmp(photo)  # not a digit of theirs changed
    assert [r.get("Name") for r in regions(doc)] == ["Somebody Else", None, "Jane Doe"]
    assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else", "Jane Doe"]
    assert doc["XMP-lr:HierarchicalSubject"] == ["Places|Berlin", "Consent|Review"]
    state = writer.read(photo)
    assert [r.ours for r in state.regions] == [False, False, True]
    assert state.foreign_names == ("Somebody Else",)


def test_removing_a_name_updates_only_our_fields(keyword_writer: XmpWriter, photo: Path):
    add_foreign(photo)
    exiftool_set(photo, "-XMP-lr:HierarchicalSubject+=People|Somebody Else")
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    named = verdict(
        face(box, Status.CLEARED, name="Jane Doe", subject=OBAMA), status=Status.CLEARED
    )
    keyword_writer.write(photo, named, PLAIN_GEOMETRY, engine="e")
    doc = exiftool_json(photo, "-XMP:all")
    assert "People|Jane Doe" in doc["XMP-lr:HierarchicalSubject"]
    assert "People/Jane Doe" in doc["XMP-digiKam:TagsList"]

    withdrawn = verdict(face(box, Status.WITHDRAWN), status=Status.WITHDRAWN)
    assert keyword_writer.write(photo, withdrawn, PLAIN_GEOMETRY, engine="e")
    doc = exiftool_json(photo, "-XMP:all")
    assert_foreign_intact(doc)
    assert [r.get("Name") for r in regions(doc)] == ["Somebody Else", None, None]
    assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else"]
    assert len(doc["XMP-iptcExt:PersonInImageWDetails"]) == 1
    assert doc["XMP-lr:HierarchicalSubject"] == [
        "Places|Berlin",
        "People|Somebody Else",
        "Consent|Withdrawn",
    ]
    assert doc["XMP-digiKam:TagsList"] == ["Places/Berlin", "Consent/Withdrawn"]
    assert b"Jane Doe" not in photo.read_bytes()
    assert str(OBAMA).encode() not in photo.read_bytes()


def test_name_keywords_written_only_on_opt_in_and_removed_on_opt_out(
    writer: XmpWriter, keyword_writer: XmpWriter, photo: Path
):
    exiftool_set(photo, "-XMP-lr:HierarchicalSubject=People|Jane Doe")  # someone else's
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    named = verdict(
        face(box, Status.CLEARED, name="Jane Doe", subject=OBAMA), status=Status.CLEARED
    )
    writer.write(photo, named, PLAIN_GEOMETRY, engine="e")
    doc = exiftool_json(photo, "-XMP:all")
    assert doc["XMP-lr:HierarchicalSubject"] == ["People|Jane Doe", "Consent|Cleared"]
    assert doc["XMP-digiKam:TagsList"] == ["Consent/Cleared"]
    withdrawn = verdict(face(box, Status.WITHDRAWN), status=Status.WITHDRAWN)
    writer.write(photo, withdrawn, PLAIN_GEOMETRY, engine="e")
    # Not ours (we wrote no name keywords): a foreign keyword stays for the privacy officer.
    assert writer.read(photo).hierarchical_subject == ("People|Jane Doe", "Consent|Withdrawn")

    exiftool_set(photo, "-XMP-lr:HierarchicalSubject=")
    keyword_writer.write(photo, named, PLAIN_GEOMETRY, engine="e")
    assert writer.read(photo).tags_list == ("Consent/Cleared", "People/Jane Doe")
    writer.write(photo, named, PLAIN_GEOMETRY, engine="e")
    state = writer.read(photo)
    assert state.hierarchical_subject == ("Consent|Cleared",)
    assert state.tags_list == ("Consent/Cleared",)
    assert state.persons == ("Jane Doe",)


def test_read_tolerates_codes_it_does_not_know(writer: XmpWriter, photo: Path):
    exiftool_set(
        photo, "-XMP-plus:ModelReleaseStatus#=MR-XYZ", "-XMP-consentry:Status=approved-by-legal"
    )
    assert exiftool_json(photo)["XMP-consentry:Status"] == "approved-by-legal"
    state = writer.read(photo)
    assert state.model_release is None and state.status is None
    assert writer.write(photo, verdict(), PLAIN_GEOMETRY, engine="e")
    assert writer.read(photo).model_release is ModelRelease.NOT_APPLICABLE


# -- sidecars -------------------------------------------------------------------------------
def test_sidecar_mode_leaves_the_image_alone_and_carries_foreign_regions(
    writer: XmpWriter, photo: Path
):
    add_foreign(photo)
    image_bytes, mtime = photo.read_bytes(), age(photo)
    sidecar = photo.with_name(photo.name + ".xmp")
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    named = verdict(
        face(box, Status.CLEARED, name="Jane Doe", subject=OBAMA), status=Status.CLEARED
    )

    assert writer.write(photo, named, PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    assert photo.read_bytes() == image_bytes and photo.stat().st_mtime_ns == mtime
    doc = exiftool_json(sidecar, "-XMP:all")
    assert [r.get("Name") for r in regions(doc)] == ["Somebody Else", None, "Jane Doe"]
    assert doc["XMP-mwg-rs:RegionInfo"]["AppliedToDimensions"]["W"] == 320
    assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else", "Jane Doe"]
    assert doc["XMP-lr:HierarchicalSubject"] == ["Places|Berlin", "Consent|Cleared"]
    assert "XMP-dc:Description" not in doc  # not ours: the image still has it

    sidecar_bytes, sidecar_mtime = sidecar.read_bytes(), age(sidecar)
    assert not writer.write(photo, named, PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    assert sidecar.read_bytes() == sidecar_bytes and sidecar.stat().st_mtime_ns == sidecar_mtime

    withdrawn = verdict(face(box, Status.WITHDRAWN), status=Status.WITHDRAWN)
    assert writer.write(photo, withdrawn, PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    doc = exiftool_json(sidecar, "-XMP:all")
    assert [r.get("Name") for r in regions(doc)] == ["Somebody Else", None, None]
    assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else"]
    assert photo.read_bytes() == image_bytes
    assert leftovers(photo.parent) == []


def test_sidecar_replaces_our_embedded_regions_instead_of_copying_them(
    writer: XmpWriter, photo: Path
):
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    named = verdict(
        face(box, Status.CLEARED, name="Jane Doe", subject=OBAMA), status=Status.CLEARED
    )
    writer.write(photo, named, PLAIN_GEOMETRY, engine="e")  # an earlier embedded write
    sidecar = photo.with_suffix(".xmp")
    writer.write(photo, verdict(face(box)), PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    state = writer.read(sidecar)
    assert [(r.name, r.ours) for r in state.regions] == [(None, True)]
    assert state.persons == () and state.person_details == ()


def jane(box: FaceBox, *, named: bool = True) -> AssetVerdict:
    """Jane Doe on `box` while named; withdrawn (no name, no subject) otherwise."""
    if named:
        return verdict(
            face(box, Status.CLEARED, name="Jane Doe", subject=OBAMA),
            status=Status.CLEARED,
            consent_ids=(CONSENT,),
        )
    return verdict(face(box, Status.WITHDRAWN), status=Status.WITHDRAWN)


def carry_jane_in_the_image(photo: Path, how: str, writer: XmpWriter) -> None:
    if how == "person in image":  # as reported: one PersonInImage entry, nothing else
        exiftool_set(photo, "-XMP-iptcExt:PersonInImage=Jane Doe")
    elif how == "someone else":
        exiftool_set(
            photo,
            "-XMP-iptcExt:PersonInImage=Jane Doe",
            "-XMP-iptcExt:PersonInImage=Somebody Else",
            "-XMP-iptcExt:PersonInImageWDetails={PersonName=Jane Doe,PersonId=urn:uuid:"
            f"{BIDEN}}}",
            "-XMP-lr:HierarchicalSubject=People|Jane Doe",
            "-XMP-lr:HierarchicalSubject=Places|Berlin",
            "-XMP-digiKam:TagsList=People/Jane Doe",
        )
    else:  # an earlier embedded write of ours, whose regions and marks another tool dropped
        writer.write(photo, jane(FaceBox(top=30, right=140, bottom=150, left=40)), PLAIN_GEOMETRY,
                     engine="e")
        exiftool_set(photo, "-XMP-mwg-rs:RegionInfo=", "-XMP-consentry:all=")
    assert writer.read(photo).persons[0] == "Jane Doe"


@pytest.mark.parametrize("how", ["person in image", "someone else", "our earlier embedded write"])
@pytest.mark.parametrize("keywords", [False, True], ids=["status-keywords", "name-keywords"])
def test_sidecar_removes_a_name_the_image_carries_too(
    writer: XmpWriter, keyword_writer: XmpWriter, photo: Path, how: str, keywords: bool
):
    """Privacy wins: once Consentry removes a name, the sidecar shows it nowhere, though the
    image (never written in sidecar mode) still lists it; and the removal stays removed."""
    chosen = keyword_writer if keywords else writer
    carry_jane_in_the_image(photo, how, writer)
    image_bytes, image_mtime = photo.read_bytes(), age(photo)
    sidecar = photo.with_name(photo.name + ".xmp")
    box = FaceBox(top=30, right=140, bottom=150, left=40)

    assert chosen.write(photo, jane(box), PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    assert not chosen.write(photo, jane(box), PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    state = chosen.read(sidecar)
    assert [(r.name, r.ours) for r in state.regions] == [("Jane Doe", True)]
    assert state.persons.count("Jane Doe") == 1

    assert chosen.write(photo, jane(box, named=False), PLAIN_GEOMETRY, engine="e",
                        sidecar=sidecar)
    doc = exiftool_json(sidecar, "-XMP:all")
    assert [r.get("Name") for r in regions(doc)] == [None]
    assert "XMP-iptcExt:PersonInImageWDetails" not in doc
    assert b"urn:uuid:" not in sidecar.read_bytes()
    theirs: list[str] = []
    their_tags: list[str] = []
    if how == "someone else":  # what else others wrote is carried as before
        assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else"]
        theirs, their_tags = ["People|Jane Doe", "Places|Berlin"], ["People/Jane Doe"]
    else:
        assert "XMP-iptcExt:PersonInImage" not in doc
    if keywords:  # we wrote name keywords: theirs equal to ours went with ours
        theirs, their_tags = ["Places|Berlin"] if theirs else [], []
    assert doc["XMP-lr:HierarchicalSubject"] == [*theirs, "Consent|Withdrawn"]
    assert doc["XMP-digiKam:TagsList"] == [*their_tags, "Consent/Withdrawn"]
    if not their_tags:  # else a name keyword someone else wrote, never ours (DESIGN §7)
        assert b"Jane Doe" not in sidecar.read_bytes()
    assert photo.read_bytes() == image_bytes and photo.stat().st_mtime_ns == image_mtime
    assert "Jane Doe" in chosen.read(photo).persons  # the image's own: not ours to edit

    # Idempotent, also for a later run (another exiftool process) that finds the name only in
    # the image: same bytes, same mtime.
    sidecar_bytes, sidecar_mtime = sidecar.read_bytes(), age(sidecar)
    withdrawn = jane(box, named=False)
    assert not chosen.write(photo, withdrawn, PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    with XmpWriter(names_as_keywords=keywords) as fresh:
        assert not fresh.write(photo, withdrawn, PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    assert sidecar.read_bytes() == sidecar_bytes
    assert sidecar.stat().st_mtime_ns == sidecar_mtime
    assert leftovers(photo.parent) == []


def test_sidecar_is_authoritative_after_consentry_first_wrote_it(writer: XmpWriter, photo: Path):
    """The image's foreign entries are carried into the sidecar by Consentry's first write;
    later writes change only our entries, so nothing removed there comes back from the image
    (not even a copy of one of our named regions someone put into the image)."""
    add_foreign(photo)
    sidecar = photo.with_name(photo.name + ".xmp")
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    assert writer.write(photo, jane(box), PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    # Another tool copies our regions into the image without our marks, and adds a name.
    subprocess.run(
        ["exiftool", "-q", "-overwrite_original", "-tagsFromFile", str(sidecar),
         "-XMP-mwg-rs:RegionInfo", "-XMP-iptcExt:PersonInImage", str(photo)],
        check=True, capture_output=True,
    )
    exiftool_set(photo, "-XMP-iptcExt:PersonInImage+=Added Later")
    assert "Jane Doe" in [r.name for r in writer.read(photo).regions]

    moved = FaceBox(top=40, right=150, bottom=160, left=50)  # detected a little elsewhere
    assert writer.write(photo, jane(moved, named=False), PLAIN_GEOMETRY, engine="e",
                        sidecar=sidecar)
    assert not writer.write(photo, jane(moved, named=False), PLAIN_GEOMETRY, engine="e",
                            sidecar=sidecar)
    assert b"Jane Doe" not in sidecar.read_bytes()
    doc = exiftool_json(sidecar, "-XMP:all")
    assert [r.get("Name") for r in regions(doc)] == ["Somebody Else", None, None]
    assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else"]


def test_a_sidecar_another_tool_made_still_gets_the_image_foreign_entries(
    writer: XmpWriter, photo: Path
):
    """Immich writes sidecars of its own (description, tags): Consentry's first write into one
    carries the image's foreign regions and people, or the sidecar would hide them."""
    add_foreign(photo)
    sidecar = photo.with_name(photo.name + ".xmp")
    exiftool_set(sidecar, "-XMP-digiKam:TagsList=Holiday", "-XMP-dc:Description=From Immich")
    assert writer.read(sidecar).regions == ()
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    assert writer.write(photo, jane(box), PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    doc = exiftool_json(sidecar, "-XMP:all")
    assert [r.get("Name") for r in regions(doc)] == ["Somebody Else", None, "Jane Doe"]
    assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else", "Jane Doe"]
    assert doc["XMP-digiKam:TagsList"] == ["Holiday", "Places/Berlin", "Consent/Cleared"]
    assert doc["XMP-dc:Description"] == "From Immich"
    assert "AGENCY-7" in doc["XMP-plus:ModelReleaseID"]
    assert not writer.write(photo, jane(box), PLAIN_GEOMETRY, engine="e", sidecar=sidecar)


def test_a_name_others_listed_before_others_merges_into_ours(
    keyword_writer: XmpWriter, photo: Path
):
    """Someone else's entry equal to one we write is ours from that write on (not only from the
    next one): the second write finds nothing to do, and withdrawal removes it."""
    exiftool_set(
        photo,
        "-XMP-iptcExt:PersonInImage=Jane Doe",
        "-XMP-iptcExt:PersonInImage=Somebody Else",
        f"-XMP-iptcExt:PersonInImageWDetails={{PersonName=Jane Doe,PersonId=urn:uuid:{BIDEN}}}",
        "-XMP-iptcExt:PersonInImageWDetails={PersonName=Somebody Else,PersonId=urn:uuid:x}",
        "-XMP-lr:HierarchicalSubject=People|Jane Doe",
        "-XMP-lr:HierarchicalSubject=Places|Berlin",
        f"-XMP-plus:ModelReleaseID={CONSENT}",
        "-XMP-plus:ModelReleaseID=AGENCY-7",
    )
    box = FaceBox(top=30, right=140, bottom=150, left=40)
    assert keyword_writer.write(photo, jane(box), PLAIN_GEOMETRY, engine="e")
    doc = exiftool_json(photo, "-XMP:all")
    assert doc["XMP-iptcExt:PersonInImage"] == ["Somebody Else", "Jane Doe"]
    assert [d["PersonId"] for d in doc["XMP-iptcExt:PersonInImageWDetails"]] == [
        ["urn:uuid:x"],
        [f"urn:uuid:{OBAMA}"],
    ]
    assert doc["XMP-lr:HierarchicalSubject"] == [
        "Places|Berlin",
        "Consent|Cleared",
        "People|Jane Doe",
    ]
    assert doc["XMP-plus:ModelReleaseID"] == ["AGENCY-7", str(CONSENT)]
    before, mtime = photo.read_bytes(), age(photo)
    assert not keyword_writer.write(photo, jane(box), PLAIN_GEOMETRY, engine="e")
    assert photo.read_bytes() == before and photo.stat().st_mtime_ns == mtime

    assert keyword_writer.write(photo, jane(box, named=False), PLAIN_GEOMETRY, engine="e")
    assert b"Jane Doe" not in photo.read_bytes()
    state = keyword_writer.read(photo)
    assert state.persons == ("Somebody Else",)
    assert state.hierarchical_subject == ("Places|Berlin", "Consent|Withdrawn")
    assert state.model_release_ids == ("AGENCY-7",)
    assert not keyword_writer.write(photo, jane(box, named=False), PLAIN_GEOMETRY, engine="e")


def test_consents_withdraw_in_a_sidecar_library_whose_images_list_the_name(
    tmp_path: Path, demo_data: Path, engine, monkeypatch: pytest.MonkeyPatch
):
    """End to end: the images already list the person in PersonInImage; `consents withdraw`
    succeeds and leaves the name in no sidecar where Consentry had put it; a later run
    rewrites nothing."""
    from typer.testing import CliRunner

    from plugin.cli import app as cli_app

    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    monkeypatch.delenv("CONSENTRY_KEY", raising=False)
    name = "George Clooney"
    lib = tmp_path / "photos"
    lib.mkdir()
    for src in ("events/2023-film-gala/IMG_0811.jpg", "events/2023-film-gala/IMG_0812.jpg",
                "portraits/IMG_3302.jpg"):
        shutil.copy(demo_data / "library" / src, lib / Path(src).name)
        exiftool_set(lib / Path(src).name, "-XMP-iptcExt:PersonInImage=Somebody Else",
                     f"-XMP-iptcExt:PersonInImage={name}")
    images = {p.name: p.read_bytes() for p in lib.glob("*.jpg")}
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(cli_app, ["--config", str(tmp_path / "consentry.toml"), *args])
        assert result.exit_code == 0, (args, result.output)
        return result.output

    cli("init", "--photos", str(lib), "--write-mode", "sidecar")
    doc = tmp_path / "quitclaim.pdf"
    doc.write_bytes(b"%PDF signed")
    cli("subjects", "add", name)
    consent = cli("consents", "add", name, "--document", str(doc), "--biometric",
                  "--channels", "all").split()[0]
    refs = [str(demo_data / f"people/George_Clooney/ref-{i}.jpg") for i in (1, 2)]
    cli("subjects", "enroll", name, *refs)
    cli("scan")
    with XmpWriter() as reader:
        named = [s for s in sorted(lib.glob("*.xmp"))
                 if any(r.name == name for r in reader.read(s).our_regions)]
        assert named, "the scan named nobody"

        cli("consents", "withdraw", consent)
        for sidecar in named:
            state = reader.read(sidecar)
            assert name.encode() not in sidecar.read_bytes(), sidecar.name
            assert state.persons == ("Somebody Else",)
            assert all(r.name is None for r in state.our_regions)
    assert {p.name: p.read_bytes() for p in lib.glob("*.jpg")} == images
    sidecars = {s: (s.read_bytes(), age(s)) for s in lib.glob("*.xmp")}
    cli("reevaluate")
    assert {s: (s.read_bytes(), s.stat().st_mtime_ns) for s in lib.glob("*.xmp")} == sidecars


# -- safety ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"this is not a photo\n", os.urandom(64)])
def test_a_corrupt_file_raises_and_leaves_nothing_behind(
    writer: XmpWriter, tmp_path: Path, content: bytes
):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(content)
    with pytest.raises(MetadataError) as caught:
        writer.write(bad, verdict(), PLAIN_GEOMETRY, engine="e")
    assert caught.value.asset == str(bad)
    assert "exiftool" in caught.value.cause
    assert bad.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jpg"]


def test_a_missing_file_raises(writer: XmpWriter, tmp_path: Path):
    with pytest.raises(MetadataError, match="not found"):
        writer.write(tmp_path / "gone.jpg", verdict(), PLAIN_GEOMETRY, engine="e")


def test_a_box_outside_the_image_is_refused_before_writing(writer: XmpWriter, photo: Path):
    before = photo.read_bytes()
    outside = verdict(face(FaceBox(top=300, right=500, bottom=400, left=400)))
    with pytest.raises(MetadataError, match="outside"):
        writer.write(photo, outside, PLAIN_GEOMETRY, engine="e")
    assert photo.read_bytes() == before


def test_permissions_are_kept(writer: XmpWriter, photo: Path):
    photo.chmod(0o640)
    writer.write(photo, verdict(), PLAIN_GEOMETRY, engine="e")
    assert photo.stat().st_mode & 0o777 == 0o640


# -- orientation ----------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_regions_land_on_the_faces_for_every_orientation(
    writer: XmpWriter, testdata: Path, tmp_path: Path, manifest: dict, orientation: int
):
    """Boxes found on the upright photo must describe the same faces on the stored pixels."""
    entry = next(p for p in manifest["photos"] if p["path"] == SUMMIT.removeprefix("demo/"))
    boxes = [
        FaceBox(top=t, right=r, bottom=b, left=lt)
        for t, r, b, lt in (f["box"] for f in entry["faces"])
    ]
    with Image.open(testdata / SUMMIT) as source:
        upright = source.convert("RGB")
    stored = stored_from_upright(upright, orientation)
    path = tmp_path / f"orientation-{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif)
    with Image.open(path) as shown:  # the photo really displays upright
        upright_again = np.asarray(ImageOps.exif_transpose(shown), dtype=np.int16)
    assert np.abs(upright_again - np.asarray(upright, dtype=np.int16)).mean() < 4

    geometry = Geometry(
        stored_width=stored.width, stored_height=stored.height, orientation=orientation
    )
    faces = [face(b, name=f"Person {i}", subject=uuid.uuid4()) for i, b in enumerate(boxes)]
    writer.write(path, verdict(*faces), geometry, engine="e")

    doc = exiftool_json(path, "-XMP-mwg-rs:RegionInfo", "-IFD0:Orientation#")
    assert doc["IFD0:Orientation"] == orientation
    assert doc["XMP-mwg-rs:RegionInfo"]["AppliedToDimensions"] == {
        "W": stored.width,
        "H": stored.height,
        "Unit": "pixel",
    }
    for box, region in zip(boxes, regions(doc), strict=True):
        area = region["Area"]
        got = (
            (area["X"] - area["W"] / 2) * stored.width,
            (area["Y"] - area["H"] / 2) * stored.height,
            (area["X"] + area["W"] / 2) * stored.width,
            (area["Y"] + area["H"] / 2) * stored.height,
        )
        expected = stored_from_upright(mask(upright.size, box), orientation).getbbox()
        assert iou(got, expected) >= 0.95, (orientation, got, expected)


# -- concurrent writes share one exiftool command -------------------------------------------
def _held_writes(writer: XmpWriter, paths: list[Path], change: AssetVerdict,
                 before_release: Any = None, sidecars: bool = False) -> dict[Path, Any]:
    """Write `change` to `paths` from one thread each while the writer's only exiftool process
    is held, so that every export queues up and goes out in one command."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    held = writer._free.get()
    try:
        with ThreadPoolExecutor(max_workers=len(paths)) as pool:
            futures = {p: pool.submit(writer.write, p, change, SUMMIT_GEOMETRY, engine="e",
                                      sidecar=p.with_suffix(".xmp") if sidecars else None)
                       for p in paths}
            deadline = time.monotonic() + 30
            while len(writer._queued) < len(paths) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(writer._queued) == len(paths)
            if before_release:
                before_release()
            writer._free.put(held)
            held = None
            outcome: dict[Path, Any] = {}
            for p, future in futures.items():
                try:
                    outcome[p] = future.result()
                except MetadataError as err:
                    outcome[p] = err
    finally:
        if held is not None:
            writer._free.put(held)
    return outcome


@pytest.mark.parametrize("sidecars", [False, True], ids=["embedded", "sidecar"])
def test_concurrent_writes_share_one_exiftool_command_and_give_the_same_bytes(
    testdata: Path, tmp_path: Path, sidecars: bool
):
    sequential, shared = tmp_path / "sequential", tmp_path / "shared"
    for folder in (sequential, shared):
        folder.mkdir()
    with XmpWriter(processes=1) as writer:
        for i in range(6):
            for folder in (sequential, shared):
                path = folder / f"IMG_{i}.jpg"
                shutil.copyfile(testdata / SUMMIT, path)
                writer.write(path, summit_verdict(), SUMMIT_GEOMETRY, engine="e",
                             sidecar=path.with_suffix(".xmp") if sidecars else None)
        change = summit_verdict(named=False, status=Status.WITHDRAWN)
        for path in sorted(sequential.glob("*.jpg")):
            assert writer.write(path, change, SUMMIT_GEOMETRY, engine="e",
                                sidecar=path.with_suffix(".xmp") if sidecars else None)
        commands = writer.counts.get("exiftool_shared_writes", 0)
        outcome = _held_writes(writer, sorted(shared.glob("*.jpg")), change, sidecars=sidecars)
        assert writer.counts["exiftool_shared_writes"] == commands + 1
    assert all(result is True for result in outcome.values())
    for path in sorted(shared.iterdir()):
        assert path.read_bytes() == (sequential / path.name).read_bytes(), path.name
    assert leftovers(shared) == []


def test_a_file_failing_in_a_shared_command_fails_alone_and_is_named(
    testdata: Path, tmp_path: Path
):
    paths = []
    for i in range(4):
        path = tmp_path / f"IMG_{i}.jpg"
        shutil.copyfile(testdata / SUMMIT, path)
        paths.append(path)
    with XmpWriter(processes=1) as writer:
        for path in paths:
            writer.write(path, summit_verdict(), SUMMIT_GEOMETRY, engine="e")
        bad = paths[2]
        # read and planned, then broken before exiftool gets to it
        outcome = _held_writes(writer, paths, summit_verdict(named=False),
                               before_release=lambda: bad.write_bytes(b"not a photo any more"))
    assert isinstance(outcome[bad], MetadataError)
    assert outcome[bad].asset == str(bad) and "exiftool" in outcome[bad].cause
    assert bad.read_bytes() == b"not a photo any more"
    for path in paths:
        if path != bad:
            assert outcome[path] is True
            assert "Barack Obama" not in raw_xmp(path)
    assert leftovers(tmp_path) == []
