"""The Python XMP reader against exiftool itself, file by file (differential).

For every file of the corpus the reader must return exactly what `XmpWriter._fetch` gets from
exiftool (same keys, same values, same types: Decimal "0.50" is not Decimal "0.5", 1 is not
True), or None so that the writer asks exiftool. Cases the reader is meant to answer also
assert that it did (not None), so a reader that always gives up cannot pass.
"""

from __future__ import annotations

import shutil
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from plugin import xmp_read
from plugin.errors import MetadataError
from plugin.models import FaceBox, Geometry, ModelRelease, Status
from plugin.xmp import Raw, XmpWriter, _raw
from tests.test_xmp import (
    BIDEN_BOX,
    OBAMA,
    OBAMA_BOX,
    PLAIN_GEOMETRY,
    SUMMIT,
    SUMMIT_GEOMETRY,
    add_foreign,
    exiftool_set,
    face,
    summit_verdict,
    verdict,
)

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")

TRICKY = ["1234", "0.50", "007", "-0", "1e5", "1.5E+3", "12345678901234567", "True", "false",
          "Zoë Ünïcode 李小龍", "a&b<c>\"d'e", " padded ", "tab\there", "2024-05-01"]


# -- helpers --------------------------------------------------------------------------------
def strict(value: Any) -> Any:
    """A value with every scalar's type and exact text, so 0.50 != 0.5 and 1 != True."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict(v) for v in value]
    return (type(value).__name__, str(value))


def fast(path: Path, *, sidecar: bool = False) -> Raw | None:
    doc = xmp_read.read_tags(path, sidecar=sidecar)
    return None if doc is None else _raw(doc)


def agree(truth_writer: XmpWriter, path: Path, *, sidecar: bool = False,
          answered: bool = True) -> Raw | None:
    """Assert the reader equals exiftool on `path` (or gave up, when `answered` is False)."""
    truth = truth_writer._fetch(path)
    got = fast(path, sidecar=sidecar)
    if answered:
        assert got is not None, f"reader gave up on {path.name}"
    if got is not None:
        assert strict(got) == strict(truth)
    return got


def plain_jpeg(path: Path, size: tuple[int, int] = (320, 240), **save: Any) -> Path:
    image = Image.new("RGB", size, (90, 120, 150))
    ImageDraw.Draw(image).ellipse((40, 30, 140, 150), fill=(220, 180, 150))
    image.save(path, quality=90, **save)
    return path


def with_app1_xmp(source: Path, target: Path, packet: bytes) -> Path:
    """`source` with `packet` as a standard XMP APP1 segment right after SOI."""
    data = source.read_bytes()
    payload = xmp_read.XMP_APP1 + packet
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    target.write_bytes(data[:2] + segment + data[2:])
    return target


def packet_of(path: Path) -> bytes:
    """The standard XMP packet of an exiftool-written JPEG (via a sidecar export)."""
    data = path.read_bytes()
    start = data.index(xmp_read.XMP_APP1) + len(xmp_read.XMP_APP1)
    length = int.from_bytes(data[start - len(xmp_read.XMP_APP1) - 2:
                                 start - len(xmp_read.XMP_APP1)], "big")
    return data[start:start - len(xmp_read.XMP_APP1) - 2 + length]


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truth():
    """exiftool only: the reference."""
    with XmpWriter(fast_read=False) as w:
        yield w


@pytest.fixture(scope="module")
def writer():
    with XmpWriter() as w:
        yield w


@pytest.fixture
def summit(testdata: Path, tmp_path: Path) -> Path:
    path = tmp_path / "IMG_2041.jpg"
    shutil.copyfile(testdata / SUMMIT, path)
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return plain_jpeg(tmp_path / "plain.jpg")


# -- the corpus -----------------------------------------------------------------------------
def test_every_demo_photo_before_and_after_consentry_writes(
    truth: XmpWriter, testdata: Path, tmp_path: Path
):
    photos = sorted((testdata / "demo" / "library").rglob("*.jpg"))
    assert photos
    with XmpWriter(names_as_keywords=True) as keywords:
        for i, source in enumerate(photos):
            path = tmp_path / f"{i:02d}{source.suffix}"
            shutil.copyfile(source, path)
            agree(truth, path, answered=False)  # some hold another tool's XMP
            with Image.open(path) as image:
                width, height = image.size
            box = FaceBox(top=0, left=0, right=min(50, width), bottom=min(60, height))
            named = verdict(face(box, Status.CLEARED, name=f"Person {i}", subject=OBAMA),
                            status=Status.CLEARED, model_release=ModelRelease.UNLIMITED,
                            channels=("web",), consent_ids=(OBAMA,), minor=i % 2 == 0)
            (keywords if i % 3 == 0 else truth).write(
                path, named, Geometry(stored_width=width, stored_height=height), engine="e")
            agree(truth, path)
            sidecar = path.with_suffix(".jpg.xmp")
            truth.write(path, named, Geometry(stored_width=width, stored_height=height),
                        engine="e", sidecar=sidecar)
            agree(truth, sidecar, sidecar=True)


def test_summit_embedded_and_sidecar(truth: XmpWriter, summit: Path):
    sidecar = summit.with_name("IMG_2041.xmp")
    truth.write(summit, summit_verdict(), SUMMIT_GEOMETRY, engine="dlib", sidecar=sidecar)
    got = agree(truth, sidecar, sidecar=True)
    assert got and got["valid_until"] == "2027:05:01 12:30:00Z"
    assert got["model_release"] == "MR-LMR" and got["unidentified"] == 1
    area = got["region_info"]["RegionList"][0]["Area"]
    assert area["X"] == Decimal("0.276199") and type(got["region_info"]["AppliedToDimensions"]
                                                     ["W"]) is int
    truth.write(summit, summit_verdict(named=False), SUMMIT_GEOMETRY, engine="dlib")
    agree(truth, summit)


def test_foreign_regions_names_and_keywords(truth: XmpWriter, photo: Path):
    add_foreign(photo)
    got = agree(truth, photo)
    assert got and got["region_info"]["RegionList"][0]["Area"]["X"] == Decimal("0.50")
    with XmpWriter(names_as_keywords=True) as keywords:
        keywords.write(photo, verdict(face(FaceBox(top=30, right=140, bottom=150, left=40),
                                           Status.CLEARED, name="Jane", subject=OBAMA),
                                      status=Status.CLEARED), PLAIN_GEOMETRY, engine="e")
    got = agree(truth, photo)
    assert got and got["name_keywords"] is True
    sidecar = photo.with_suffix(".xmp")
    truth.write(photo, verdict(), PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    agree(truth, sidecar, sidecar=True)


@pytest.mark.parametrize("name", TRICKY)
def test_tricky_values(truth: XmpWriter, photo: Path, name: str):
    escaped = name.replace("|", "||").replace(",", "|,").replace("}", "|}")
    if escaped[:1] in (" ", "{", "["):
        escaped = "|" + escaped
    exiftool_set(
        photo,
        f"-XMP-iptcExt:PersonInImage={name}",
        "-XMP-iptcExt:PersonInImage+=second",
        f"-XMP-lr:HierarchicalSubject=People|{name}",
        f"-XMP-digiKam:TagsList={name}",
        f"-XMP-dc:Subject={name}",
        f"-XMP-dc:Description={name}",
        f"-XMP-plus:ModelReleaseID={name}",
        f"-XMP-consentry:Engine={name}",
        f"-XMP-consentry:Status={name}",
        "-XMP-mwg-rs:RegionInfo={AppliedToDimensions={W=320,H=240,Unit=pixel},RegionList=["
        f"{{Area={{X=0.50,Y=0.5,W=0.1,H=0.1,Unit=normalized}},Name={escaped},Type=Face,"
        f"Description={escaped}}}]}}",
        f"-XMP-iptcExt:PersonInImageWDetails={{PersonName={escaped},PersonId={escaped}}}",
    )
    got = agree(truth, photo)
    assert got is not None
    # a second write by Consentry keeps them, and the reader still agrees
    truth.write(photo, verdict(face(FaceBox(top=30, right=140, bottom=150, left=40))),
                PLAIN_GEOMETRY, engine="e")
    agree(truth, photo)


def test_numbers_booleans_and_dates_as_exiftool_prints_them():
    assert xmp_read.json_value("1234") == 1234 and type(xmp_read.json_value("1")) is int
    assert str(xmp_read.json_value("0.50")) == "0.50"
    assert xmp_read.json_value("007") == "007"
    assert xmp_read.json_value("TRUE") is True and xmp_read.json_value("False") is False
    assert xmp_read.json_value("12345678901234567") == "12345678901234567"
    assert xmp_read._date("2027-05-01T12:30:00Z") == "2027:05:01 12:30:00Z"
    assert xmp_read._date("2027-05-01T12:30+02:00") == "2027:05:01 12:30+02:00"
    assert xmp_read._date("2027-05") == "2027:05"
    assert xmp_read._plus_code("http://ns.useplus.org/ldf/vocab/AG-A16") == "AG-A16"


@pytest.mark.parametrize(
    "assignments",
    [
        ["-XMP-plus:MinorModelAgeDisclosure#=AG-A16", "-XMP-plus:ModelReleaseStatus#=MR-UMR"],
        ["-XMP-plus:ModelReleaseStatus#=MR-SOMETHING-NEW", "-XMP-consentry:NameKeywords=False"],
        ["-XMP-consentry:ValidUntil=2030:01:02 03:04:05+02:00", "-XMP-consentry:Unidentified=12"],
        ["-XMP-consentry:ValidUntil=2030:01:02", "-XMP-consentry:NameKeywords=True"],
        ["-XMP-consentry:Channels=web", "-XMP-consentry:Channels+=print",
         "-XMP-consentry:ConsentIDs=0c1", "-XMP-consentry:Regions=0.1,0.2,0.3,0.4"],
    ],
)
def test_codes_dates_and_booleans(truth: XmpWriter, photo: Path, assignments: list[str]):
    exiftool_set(photo, *assignments)
    agree(truth, photo)


def test_forms_the_reader_leaves_to_exiftool(truth: XmpWriter, photo: Path):
    exiftool_set(photo, "-XMP-dc:Description=default", "-XMP-dc:Description-de=Hallo",
                 "-XMP-iptcExt:PersonInImageWDetails={PersonName=X,PersonName-de=Y}")
    assert agree(truth, photo, answered=False) is None  # lang-alt in several languages
    exiftool_set(photo, "-XMP-dc:Description-de=", "-XMP-iptcExt:PersonInImageWDetails=",
                 "-XMP-mwg-rs:RegionInfo={RegionList=[{Type#=Gadget,Name=X}]}")
    assert truth._fetch(photo)["region_info"]["RegionList"][0]["Type"] == "Unknown (Gadget)"
    assert agree(truth, photo, answered=False) is None  # outside a closed choice
    exiftool_set(photo, "-XMP-mwg-rs:RegionInfo={RegionList=[{FocusUsage#=EvaluatedUsed}]}")
    assert agree(truth, photo, answered=False) is None  # a field the reader does not know


def test_a_jpeg_without_xmp_reads_as_empty(truth: XmpWriter, photo: Path, tmp_path: Path):
    got = agree(truth, photo)
    assert got is not None and all(v in (None, []) for v in got.values())
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera Maker"
    agree(truth, plain_jpeg(tmp_path / "exif.jpg", exif=exif.tobytes()))


def test_sidecar_under_a_temp_name_reads_the_same(truth: XmpWriter, photo: Path):
    sidecar = photo.with_suffix(".xmp")
    truth.write(photo, verdict(face(FaceBox(top=30, right=140, bottom=150, left=40))),
                PLAIN_GEOMETRY, engine="e", sidecar=sidecar)
    tmp = photo.with_name(".plain.xmp.consentry-0000.tmp")
    shutil.copyfile(sidecar, tmp)
    agree(truth, tmp, sidecar=True)


def test_big_lists_and_extended_xmp_go_to_exiftool(truth: XmpWriter, photo: Path):
    exiftool_set(photo, *(f"-XMP-dc:Subject+=k{i}" for i in range(1000)))
    assert agree(truth, photo, answered=False) is None  # exiftool keeps only 1000 items
    exiftool_set(photo, "-XMP-dc:Subject=",
                 *(f"-XMP-lr:HierarchicalSubject+=People|{'x' * 90}{i}" for i in range(800)))
    assert b"http://ns.adobe.com/xmp/extension/" in photo.read_bytes()
    assert agree(truth, photo, answered=False) is None


# -- packets not from exiftool, hostile or broken ----------------------------------------------
def test_a_packet_another_tool_wrote_goes_to_exiftool(truth: XmpWriter, photo: Path,
                                                      tmp_path: Path):
    exiftool_set(photo, "-XMP-dc:Subject=Berlin")
    packet = packet_of(photo).replace(b"Image::ExifTool 12.", b"Adobe XMP Core 5.")
    other = with_app1_xmp(plain_jpeg(tmp_path / "base.jpg"), tmp_path / "other.jpg", packet)
    assert agree(truth, other, answered=False) is None
    sidecar = tmp_path / "other.xmp"
    sidecar.write_bytes(packet)
    assert fast(sidecar, sidecar=True) is None


@pytest.mark.parametrize("hostile", [
    b"<?xpacket begin='' id='W5M0MpCehiHzreSzNTczkc9d'?>\n<!DOCTYPE x [<!ENTITY a 'aaaaaaaaaa'>"
    + b"".join(b"<!ENTITY %c '%s'>" % (98 + i, (b"&%c;" % (97 + i)) * 10) for i in range(9))
    + b"]>\n<x:xmpmeta xmlns:x='adobe:ns:meta/' x:xmptk='Image::ExifTool 12.57'>"
    b"<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
    b"<rdf:Description rdf:about='' xmlns:dc='http://purl.org/dc/elements/1.1/'>"
    b"<dc:subject><rdf:Bag><rdf:li>&j;</rdf:li></rdf:Bag></dc:subject>"
    b"</rdf:Description></rdf:RDF></x:xmpmeta>\n<?xpacket end='w'?>",
    b"<?xpacket begin='' id='W5M0MpCehiHzreSzNTczkc9d'?>\n<!DOCTYPE x SYSTEM 'file:///etc/passwd'>"
    b"<x:xmpmeta xmlns:x='adobe:ns:meta/' x:xmptk='Image::ExifTool 12.57'/>\n<?xpacket end='w'?>",
])
def test_entities_are_never_expanded(tmp_path: Path, hostile: bytes):
    sidecar = tmp_path / "bomb.xmp"
    sidecar.write_bytes(hostile)
    started = time.perf_counter()
    assert fast(sidecar, sidecar=True) is None
    jpeg = with_app1_xmp(plain_jpeg(tmp_path / "base.jpg"), tmp_path / "bomb.jpg", hostile)
    assert fast(jpeg) is None
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("mangle", [
    lambda p: p.replace(b"<rdf:li>", b"<rdf:li><!-- c -->", 1),
    lambda p: p.replace(b"<rdf:li>", b"<rdf:li><![CDATA[x]]>", 1),
    lambda p: p.replace(b"</rdf:RDF>", b"", 1),
    lambda p: p.replace(b"<rdf:li>", b"<rdf:li>\r\n", 1),
    lambda p: p.replace(b"<rdf:li>", b"<rdf:li rdf:nodeID='n'>", 1),
    lambda p: p.replace(b"xmlns:dc='http://purl.org/dc/elements/1.1/'",
                        b"xmlns:dc='http://example.com/dc/'", 1),
    lambda p: p.replace(b"<rdf:Bag>", b"<rdf:Bag></rdf:Bag><rdf:Bag>", 1),
])
def test_unusual_forms_are_left_to_exiftool(truth: XmpWriter, photo: Path, tmp_path: Path,
                                            mangle):
    exiftool_set(photo, "-XMP-dc:Subject=Berlin", "-XMP-dc:Subject+=Paris")
    packet = mangle(packet_of(photo))
    odd = with_app1_xmp(plain_jpeg(tmp_path / "base.jpg"), tmp_path / "odd.jpg", packet)
    assert fast(odd) is None


def test_an_empty_bag_is_left_to_exiftool(truth: XmpWriter, photo: Path, tmp_path: Path):
    exiftool_set(photo, "-XMP-dc:Subject=Berlin")
    packet = packet_of(photo).replace(b"<rdf:li>Berlin</rdf:li>", b"")
    odd = with_app1_xmp(plain_jpeg(tmp_path / "base.jpg"), tmp_path / "empty.jpg", packet)
    assert agree(truth, odd, answered=False) is None


@pytest.mark.parametrize("cut", [3, 40, -200])
def test_a_truncated_jpeg_is_left_to_exiftool(truth: XmpWriter, summit: Path, cut: int):
    truth.write(summit, summit_verdict(), SUMMIT_GEOMETRY, engine="dlib")
    data = summit.read_bytes()
    summit.write_bytes(data[:cut])
    assert fast(summit) is None
    if cut < 0:  # exiftool copes with a cut in the image data: so does the writer
        with XmpWriter() as fresh:
            assert fresh.write(summit, summit_verdict(named=False), SUMMIT_GEOMETRY, engine="d")
            assert fresh.counts.get("fast_reads", 0) == 0
        return
    # exiftool reads it with a warning only; writing it fails, naming the file
    with pytest.raises(MetadataError) as caught:
        truth.write(summit, summit_verdict(named=False), SUMMIT_GEOMETRY, engine="dlib")
    assert caught.value.asset == str(summit)
    assert summit.read_bytes() == data[:cut]


# -- the writer uses it ---------------------------------------------------------------------
def test_the_reader_knows_every_tag_the_writer_reads():
    """A tag added to xmp.TAGS without the reader knowing it would turn the fast path off."""
    from plugin.xmp import _FAST_READ_OK, TAGS

    assert _FAST_READ_OK, [t.arg for t in TAGS.values() if t.arg not in xmp_read.SUPPORTED]


def test_a_relabel_reads_in_python_and_runs_exiftool_once(writer: XmpWriter, summit: Path):
    writer.write(summit, summit_verdict(), SUMMIT_GEOMETRY, engine="dlib")
    before = dict(writer.counts)
    changed = verdict(face(OBAMA_BOX, Status.WITHDRAWN), face(BIDEN_BOX),
                      status=Status.WITHDRAWN)
    assert writer.write(summit, changed, SUMMIT_GEOMETRY, engine="dlib")
    assert writer.counts.get("exiftool_reads", 0) == before.get("exiftool_reads", 0)
    assert writer.counts["fast_reads"] == before.get("fast_reads", 0) + 2  # image, verify
    assert not writer.write(summit, changed, SUMMIT_GEOMETRY, engine="dlib")
    with XmpWriter(fast_read=False) as slow:
        assert not slow.write(summit, changed, SUMMIT_GEOMETRY, engine="dlib")


# -- hand-made packets (an exiftool-written sidecar, edited) -----------------------------------
@pytest.fixture
def sidecar_packet(truth: XmpWriter, photo: Path) -> bytes:
    exiftool_set(photo, "-XMP-dc:Subject=Berlin", "-XMP-consentry:NameKeywords=True",
                 "-XMP-consentry:Unidentified=2", "-XMP-consentry:ValidUntil=2027:05:01 10:00:00Z",
                 "-XMP-plus:ModelReleaseStatus#=MR-LMR", "-XMP-consentry:Engine=dlib")
    return packet_of(photo)


@pytest.mark.parametrize(("old", "new"), [
    (b">True<", b">yes<"),
    (b">2<", b">abc<"),
    (b">2<", b">0.50<"),
    (b"2027-05-01T10:00:00Z", b"garbage"),
    (b"2027-05-01T10:00:00Z", b"2027-05-01"),
    (b"2027-05-01T10:00:00Z", b"2027-05-01T10:00:00.123+02:00"),
    (b"2027-05-01T10:00:00Z", b"2027-05-01T10:00"),
    (b"vocab/MR-LMR", b"vocab/MR-XYZ"),
    (b"http://ns.useplus.org/ldf/vocab/MR-LMR", b"weird"),
    (b">dlib<", b">  spaced\ttext  <"),
    (b">dlib<", b">&#x41;&amp;&lt;&#65;<"),
])
def test_edited_values_read_as_exiftool_reads_them(truth: XmpWriter, tmp_path: Path,
                                                   sidecar_packet: bytes, old: bytes, new: bytes):
    assert old in sidecar_packet
    sidecar = tmp_path / "edited.xmp"
    sidecar.write_bytes(sidecar_packet.replace(old, new, 1))
    agree(truth, sidecar, sidecar=True)


@pytest.mark.parametrize(("old", "new"), [
    (b"<dc:subject>", b"<dc:SUBJECT>"),  # exiftool lower-cases an all-uppercase name
    (b"<consentry:Engine>dlib</consentry:Engine>", b"<consentry:engine>x</consentry:engine>"),
    (b"xmlns:dc='http://purl.org/dc/elements/1.1/'", b"xmlns:dc='http://purl.org/dc/elements/1.1/'"
     b" xmlns:dcx='http://purl.org/dc/elements/1.2/'"),  # another version: same namespace
    (b"<consentry:Engine>dlib</consentry:Engine>", b"<consentry:Engine></consentry:Engine>"),
    (b"<consentry:Engine>dlib</consentry:Engine>", b"<Engine xmlns='http://x/'>d</Engine>"),
    (b"<rdf:li>Berlin</rdf:li>", b"<rdf:li>Ber>lin</rdf:li>"),
])
def test_edited_forms_are_left_to_exiftool(truth: XmpWriter, tmp_path: Path,
                                           sidecar_packet: bytes, old: bytes, new: bytes):
    assert old in sidecar_packet
    sidecar = tmp_path / "edited.xmp"
    sidecar.write_bytes(sidecar_packet.replace(old, new, 1))
    assert agree(truth, sidecar, sidecar=True, answered=False) is None
